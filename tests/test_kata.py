"""StratoVirt 2.x's command line and QMP as Kata Containers' StratoVirt driver uses them
(kata-containers: src/runtime/virtcontainers/stratovirt.go, and govmm's qmp.go), on the
probe: Kata's arguments in Kata's order, the tap passed as a descriptor, govmm's greeting
check, and its block hot-plug sequence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.config import ConfigError, VmConfig, load_config

from .conftest import ROOT, Vm, needs_kvm
from .netns import NetNs, needs_netns
from .test_cli import usage_error
from .test_hotplug import Session, image
from .test_virtio_console import talk

LAUNCH = ROOT / "tests" / "kata_launch.py"
MiB = 1 << 20


def kata_args(kernel: Path, vm_dir: Path, append: str, vm_id: str) -> list[str]:
    """What Kata's createParams and the devices' getParams give StratoVirt, in that order:
    rng, console (Kata's debug mode), the root disk, the NIC on a tap at fd 4. (Its vsock and
    virtio-fs are not in yet.)"""
    return ["-name", f"sandbox-{vm_id}", "-uuid", vm_id, "-smp", "2", "-m", "256",
            "-kernel", str(kernel), "-append", append,
            "-qmp", f"unix:{vm_dir / 'qmp.socket'},server,nowait", "-D", "-disable-seccomp",
            "-machine", "type=microvm,dump-guest-core=off",
            "-object", "rng-random,id=objrng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
            "-device", "virtio-serial-device,id=virtio-serial0",
            "-chardev", f"socket,id=charconsole0,path={vm_dir / 'console.socket'},server,nowait",
            "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
            "-drive", f"id=rootfs,file={vm_dir / 'rootfs.img'},readonly=off,direct=off",
            "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
            "-netdev", "tap,id=eth0,fds=4",
            "-device", "virtio-net-device,netdev=eth0,id=eth0,mac=0e:90:df:9f:a8:88"]


class Govmm:
    """A QMP connection that checks what Kata's govmm checks: the greeting must say QEMU 5
    or later (QMPStartWithConn), then qmp_capabilities."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")
        self.events: list[dict] = []
        greeting = self._read()
        qemu = greeting["QMP"]["version"]["qemu"]
        assert qemu["major"] >= 5, f"govmm requires qemu version 5.0 or later, this is {qemu}"
        assert self.execute("qmp_capabilities") == {"return": {}}

    def _read(self) -> dict:
        line = self.f.readline()
        assert line.endswith(b"\n"), line
        return json.loads(line)

    def execute(self, name: str, **arguments: object) -> dict:
        """govmm's framing: one JSON object and a newline; events on the way are kept."""
        request = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.s.sendall(json.dumps(request, sort_keys=True).encode() + b"\n")
        while "event" in (reply := self._read()):
            self.events.append(reply)
        return reply

    def close(self) -> None:
        self.f.close()
        self.s.close()


@needs_netns
def test_kata_command_line_runs_every_device(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    vm_id = str(uuid.uuid4())
    root = image(tmp_path / "rootfs.img", MiB, 3)
    ns = NetNs(("tap0",))
    try:
        # -serial stdio is ours: the probe reports on the UART, and Kata's guests do not use it.
        vm = Vm(*kata_args(probe / "probe.elf", tmp_path, "probe.run=blk,net,rng,console,wait", vm_id),
                "-serial", "stdio", prefix=tuple(ns.cmd(sys.executable, str(LAUNCH), "tap0", "--")))
        vms.append(vm)
        vm.wait_line("probe: console ready")
        assert talk(tmp_path / "console.socket", second_client=False)[0] == b"pong ping from the host\n"
        vm.wait_line("probe: waiting")
    finally:
        ns.close()
    assert "probe: test net ok" in vm.seen and "probe: test rng ok" in vm.seen
    blk0 = next(line for line in vm.seen if line.startswith("probe: blk0 "))
    assert f"read-crc32={zlib.crc32(root.read_bytes()[:4096]):#x} write=ok flush=ok readback=ok" in blk0
    with open(f"/proc/{vm.proc.pid}/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "0"         # -D took no value: -disable-seccomp held

    # Kata's waitVM connects, checks the greeting and leaves; later calls open a new connection.
    Govmm(tmp_path / "qmp.socket").close()
    qmp = Govmm(tmp_path / "qmp.socket")
    assert qmp.execute("query-uuid") == {"return": {"UUID": vm_id}}
    assert qmp.execute("query-name") == {"return": {"name": f"sandbox-{vm_id}"}}
    cpus = qmp.execute("query-cpus")["return"]      # Kata pins each vCPU's thread
    for cpu in cpus:
        with open(f"/proc/{vm.proc.pid}/task/{cpu['thread_id']}/comm") as f:
            assert f.read().strip() == f"vcpu{cpu['CPU']}"
    assert [c["CPU"] for c in cpus] == [0, 1]
    assert qmp.execute("quit") == {"return": {}}
    code, err = vm.finish()
    assert code == 0
    # -D alone: the log on stderr (the VM's name, from -name, in its lines).
    assert f"INFO [MainThread] altovirt: VM sandbox-{vm_id} stopped" in err


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A host block device (a loop device on a 2 MiB image), for blockdev-add's host_device."""
    backing = image(tmp_path / "loop.img", 2 * MiB, 9)
    run = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: no loop device for host_device ({run.stderr.strip()})")
    dev = Path(run.stdout.strip())
    yield dev
    subprocess.run(["losetup", "--detach", str(dev)], check=True)


@needs_kvm
def test_kata_block_hotplug(probe: Path, tmp_path: Path, vms: list[Vm], loop_device: Path) -> None:
    """hotplugBlk and RemoveDevice: node-name, id and drive are one name, the file driver is
    host_device for a block device, addr is the slot in decimal, romfile is empty."""
    sock = tmp_path / "qmp.sock"
    root = image(tmp_path / "root.img", MiB, 0)
    vm = Vm("-kernel", str(probe / "probe.elf"), "-drive", f"id=rootfs,file={root},readonly=on,direct=off",
            "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0", "-append", "probe.run=hotplug",
            "-serial", "stdio", "-qmp", f"unix:{sock},server,nowait")
    vms.append(vm)
    shell = Session(vm, sock)
    qmp = Govmm(sock)
    drive = "drive-" + "0123456789abcdef0123456789"[:25]        # MakeNameID: at most 31 characters
    assert qmp.execute("blockdev-add", driver="raw", **{"node-name": drive, "read-only": False},
                       file={"aio": "native", "driver": "host_device", "filename": str(loop_device)}) == \
        {"return": {}}
    assert qmp.execute("device_add", addr="1", drive=drive, driver="virtio-blk-mmio", id=drive,
                       romfile="") == {"return": {}}
    assert shell.shell("wait", "config-change") == "probe: config-change blk1"
    assert shell.scan()[1] == "blk1 capacity=4096 gen=1"
    crc = zlib.crc32((tmp_path / "loop.img").read_bytes()[:4096])
    assert shell.shell("rw 1", "rw blk1") == (f"probe: rw blk1 capacity=4096 read=ok crc={crc:#x} write=ok "
                                              "flush=ok readback=ok")
    # The root disk is read-only, as Kata's rootfs is.
    assert " write=ioerr " in shell.shell("rw 0", "rw blk0")

    # RemoveDevice waits for the reply and DEVICE_DELETED; ours comes first, as StratoVirt's.
    assert qmp.execute("device_del", id=drive) == {"return": {}}
    assert [(e["event"], e["data"]["device"]) for e in qmp.events] == [("DEVICE_DELETED", drive)]
    assert shell.shell("wait", "config-change") == "probe: config-change blk1"
    # Kata's failure path deletes the node; here it succeeds (StratoVirt refuses every blockdev-del).
    assert qmp.execute("blockdev-del", **{"node-name": drive}) == {"return": {}}

    # What govmm could send that AltoVirt does not do: refused, nothing changed.
    bad = [({"driver": "host_device", "filename": str(root)}, "'host_device' driver requires"),
           ({"driver": "file", "filename": str(root), "aio": "x"}, "Parameter 'file.aio' expects one of")]
    for file, error in bad:
        reply = qmp.execute("blockdev-add", driver="raw", file=file, **{"node-name": "x"})
        assert error in reply["error"]["desc"]
    image(tmp_path / "spare.img", MiB, 1)
    qmp.execute("blockdev-add", **{"node-name": "spare"},
                file={"driver": "file", "filename": str(tmp_path / "spare.img")})
    assert "must equal 'id'" in qmp.execute("device_add", id="spare", drive="other",
                                             driver="virtio-blk-mmio")["error"]["desc"]
    assert "no option ROM" in qmp.execute("device_add", id="spare", driver="virtio-blk-mmio",
                                          romfile="efi.rom")["error"]["desc"]
    assert shell.scan()[1] == "blk1 capacity=0 gen=2"
    qmp.close()
    shell.close()


def config(*args: str) -> VmConfig:
    return load_config(["-kernel", str(ROOT / "pyproject.toml"), *args])


def test_two_syntaxes_side_by_side(tmp_path: Path) -> None:
    disk, tools = tmp_path / "a.img", tmp_path / "b.img"
    for p in (disk, tools):
        p.write_bytes(bytes(MiB))
    cfg = config("-drive", f"id=a,file={disk},readonly,direct=off",
                 "-device", "virtio-blk-device,drive=a,id=vda",
                 "-drive", f"id=b,file={tools},serial=tools",          # 2020: a disk by itself
                 "-m", "2048", "-D", "-machine", "microvm,dump-guest-core=off")
    assert [(d.id, d.path, d.read_only, d.direct, d.serial) for d in cfg.drives] == \
        [("vda", str(disk), True, False, None), ("b", str(tools), False, True, "tools")]
    assert cfg.mem_size == 2048 * MiB and cfg.log_stderr and cfg.log_file is None and cfg.omit_vm_memory
    assert config("-m", "268435456").mem_size == 256 * MiB          # 2020: bytes
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        net = config("-netdev", f"tap,id=n,fd={fd}", "-device", "virtio-net-device,netdev=n,id=eth0").nets[0]
        assert (net.id, net.tap, net.fd, net.vhost) == ("eth0", "", fd, False)
    finally:
        os.close(fd)


@pytest.mark.parametrize("args, error", [
    (["-D", "-m"], "-m: missing value"),
    (["-name", "-disable-seccomp"], "-name: missing value (-disable-seccomp is an option)"),
    (["-drive", "id=d,file=/etc/hostname", "-device", "virtio-blk-device,drive=x,id=v"],
     "-device v: no -drive id=x"),
    (["-netdev", "tap,id=n,ifname=tap9"], "-netdev id=n: no -device uses it"),
    (["-netdev", "tap,id=n,fds=5:6", "-device", "virtio-net-device,netdev=n,id=e"],
     "multiqueue is not supported"),
    (["-netdev", "tap,id=n,fd=999", "-device", "virtio-net-device,netdev=n,id=e"],
     "file descriptor 999 is not open in the VMM"),
    (["-netdev", "tap,id=n,ifname=t0,fd=5", "-device", "virtio-net-device,netdev=n,id=e"],
     "give the tap as one of ifname=, fd= or fds="),
    (["-netdev", "tap,id=n,ifname=t0,vhostfd=5", "-device", "virtio-net-device,netdev=n,id=e"],
     "vhostfd= needs vhost=on"),
    (["-netdev", "vhost-user,id=n"], "-netdev: type 'vhost-user'; accepted: tap"),
    (["-object", "rng-random,id=r,filename=/etc/passwd", "-device", "virtio-rng-device,rng=r"],
     "filename='/etc/passwd'; accepted: /dev/urandom, /dev/random"),
    (["-object", "iothread,id=io0"], "-object: type 'iothread'; accepted: rng-random"),
    (["-device", "virtio-rng-device,rng=missing"], "no -object rng-random,id=missing"),
    (["-chardev", "socket,id=c,path=/tmp/c.sock,server", "-device", "virtconsole,chardev=c,id=con"],
     "virtconsole: needs -device virtio-serial-device"),
    (["-device", "virtio-serial-device"], "has no port"),
    (["-device", "virtio-serial-device", "-chardev", "socket,id=c,path=/tmp/c.sock",
      "-device", "virtconsole,chardev=c,id=con"], "must be a server"),
    (["-device", "virtio-serial-device", "-chardev", "socket,id=c,path=/tmp/c.sock,server",
      "-device", "virtconsole,chardev=c,id=con,nr=1"], "nr=1; accepted: 0"),
    (["-mon", "chardev=c,mode=readline"], "-mon: mode='readline'; accepted: control"),
    (["-mon", "chardev=c"], "-mon: no -chardev socket,id=c"),
    (["-machine", "accel=tcg"], "accel='tcg'; accepted: kvm"),
    (["-uuid", "not-a-uuid"], "-uuid: invalid UUID"),
    (["-drive", "id=d,file=/etc/hostname,format=qcow2"], "format='qcow2'; accepted: raw"),
    (["-drive", "id=d,file=/etc/hostname,if=virtio"], "if='virtio'; accepted: none"),
    (["-device", "vhost-user-fs-device,chardev=c,tag=t,id=f"], "f: no -chardev socket,id=c"),
    (["-chardev", "socket,id=c,path=/tmp/vfs.sock",
      "-device", f"vhost-user-fs-device,chardev=c,tag={'t' * 37},id=f"], "give 1 to 36 bytes"),
    (["-device", "virtio-blk-pci,drive=d,id=v"], "virtio-blk-pci: a PCI device; it needs -machine q35"),
    (["-device", "virtio-blk-device,id=v"], "-device virtio-blk-device: missing key 'drive'"),
    (["-netdev", "tap,id=n,ifname=t0,zz=1,aa=1"],
     "-netdev tap: unknown key 'zz'; accepted: fd, fds, id, ifname, queues, type, vhost, vhostfd"),
])
def test_bad_command_lines(args: list[str], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(*args)
    assert error in str(e.value)


@needs_kvm
@pytest.mark.skipif(os.path.exists("/dev/vhost-vsock"), reason="this host has /dev/vhost-vsock; the "
                    "Linux test bed drives vhost-vsock (tests/linux/test_kata.py)")
def test_without_vhost_vsock_one_line(probe: Path) -> None:
    assert usage_error("-kernel", str(probe / "probe.elf"), "-device",
                       "vhost-vsock-device,id=vsock-id,guest-cid=3") == (
        "altovirt: error: -device vhost-vsock-device id=vsock-id: /dev/vhost-vsock: "
        "No such file or directory (load the vhost_vsock module)")
