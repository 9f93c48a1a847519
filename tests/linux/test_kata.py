"""Kata Containers' StratoVirt command line, as its driver builds it (see tests/test_kata.py),
booting Debian's kernel in the test bed: the entropy device, the debug console, the vsock the
agent talks on (the kernel's vhost-vsock, its descriptor passed as Kata passes it), the
container's shared directory (virtio-fs with QEMU's virtiofsd, on shared RAM), the NIC on a
tap passed by descriptor, and Kata's QMP block hot-plug, each used by Linux. The tests share
one VM, in file order; the last one kills virtiofsd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..test_kata import Govmm
from ..testbed import debian, guest, initramfs
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(900)     # the first test includes the boot
ROOT = Path(__file__).resolve().parents[2]
# Kata's kernel parameters for a microvm (getKernelParams), "ramdom" as Kata spells it. Two are
# left out: acpi=off, since Debian's kernel finds virtio-mmio devices only in the DSDT (Kata's
# own guest kernel has CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), and 8250.nr_uarts=0, since the test
# drives the guest's shell on its serial port.
KATA_APPEND = "reboot=k panic=1 net.ifnames=0 ramdom.trust_cpu=on pci=off iommu=off"
AGENT_PORT = 1024                         # where Kata's agent listens, on vsock
CID = 1000 + os.getpid() % 50000          # unique on this host while the test runs
HOTPLUGGED = "on a disk Kata plugged\n"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SHARED = "/run/kata-containers/shared/containers"   # where Kata's agent mounts kataShared


@dataclass
class Machine:
    g: guest.LinuxGuest
    ns: Netns
    dir: Path
    vm_id: str
    virtiofsd: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("kata")
    (d / "src").mkdir()
    (d / "src" / "hello.txt").write_text(HOTPLUGGED)
    guest.make_ext4(d / "volume.img", "16M", d / "src")
    (d / "shared").mkdir()
    (d / "shared" / "from-host.txt").write_text("written on the host\n")
    initrd = initramfs.build(kernel, modules=(*initramfs.DEFAULT_MODULES, "virtiofs"))
    # As Kata's setupVirtiofsDaemon: the back end first, listening where the VMM will connect.
    sock = d / "virtiofs_kata.socket"
    virtiofsd = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={d / 'shared'}",
                                  "-o", "cache=none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert virtiofsd.poll() is None and time.monotonic() < deadline, "virtiofsd did not start"
        time.sleep(0.05)
    ns = Netns("tap0")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    vm_id = str(uuid.uuid4())
    launch = [sys.executable, str(ROOT / "tests" / "kata_launch.py"), "--vhost-vsock", str(CID), "tap0", "--"]
    argv = [sys.executable, "-m", "altovirt",
            "-name", f"sandbox-{vm_id}", "-uuid", vm_id, "-smp", "2", "-m", "1024",
            "-kernel", str(kernel.vmlinuz),
            "-append", f"{guest.APPEND} guest.ip={GUEST_IP}/{PREFIX} {KATA_APPEND}",
            "-qmp", f"unix:{d / 'qmp.socket'},server,nowait", "-D", "-disable-seccomp",
            "-machine", "type=microvm,dump-guest-core=off,mem-share=on", "-initrd", str(initrd),
            "-object", "rng-random,id=objrng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
            "-device", "virtio-serial-device,id=virtio-serial0",
            "-chardev", f"socket,id=charconsole0,path={d / 'console.socket'},server,nowait",
            "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
            "-device", f"vhost-vsock-device,id=vsock-id,guest-cid={CID},vhostfd=3",
            "-chardev", f"socket,id=virtio_fs,path={sock},server,nowait",
            "-device", "vhost-user-fs-device,chardev=virtio_fs,tag=kataShared,id=virtio-fs0",
            "-netdev", "tap,id=eth0,fds=4",
            "-device", "virtio-net-device,netdev=eth0,id=eth0,mac=0e:90:df:9f:a8:88",
            "-serial", "stdio"]           # ours: the test drives the guest's serial shell
    g = guest.LinuxGuest([*ns.prefix, *launch, *argv], log_path=d / "serial.log")
    try:
        g.wait_ready(BOOT_TIMEOUT)
        yield Machine(g, ns, d, vm_id, virtiofsd)
    finally:
        g.close()
        ns.close()
        virtiofsd.kill()
        virtiofsd.wait()


def test_every_device_has_its_driver(vm: Machine) -> None:
    drivers = vm.g.check("for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done")
    # 6 disk and 2 NIC slots (QMP: ready for hot-plug), the console, vsock, virtio-fs and rng.
    assert sorted(drivers.split()) == sorted(["virtio_blk"] * 6 + ["virtio_net"] * 2 + [
        "virtio_console", "vmw_vsock_virtio_transport", "virtio_rng", "virtiofs"])
    assert vm.g.check("cat /sys/class/misc/hw_random/rng_current").strip().startswith("virtio_rng")


def test_vhost_vsock_from_the_host_to_the_agent_port(vm: Machine) -> None:
    """What Kata's runtime does to reach its agent: AF_VSOCK to the guest's CID, port 1024."""
    assert vm.g.check("vsock cid").strip() == str(CID)
    vm.g.check(f"vsock listen -b -e {AGENT_PORT}")
    deadline = time.monotonic() + 30
    while True:                             # the listener may still be starting
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect((CID, AGENT_PORT))
            break
        except (ConnectionResetError, ConnectionRefusedError):
            s.close()
            assert time.monotonic() < deadline, "the guest's listener never answered"
            time.sleep(0.2)
    with s:
        s.sendall(b"hello agent\n")
        assert s.recv(100) == b"hello agent\n"


def test_vhost_vsock_from_the_guest_to_the_host(vm: Machine) -> None:
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as srv:
        srv.bind((socket.VMADDR_CID_ANY, 5300))
        srv.listen(1)
        srv.settimeout(60)
        vm.g.check("(echo ping over vhost-vsock | vsock connect 2 5300 > /tmp/vv-reply &) ; true")
        conn, (peer_cid, _) = srv.accept()
        with conn:
            conn.settimeout(30)
            assert peer_cid == CID and conn.recv(100) == b"ping over vhost-vsock\n"
            conn.sendall(b"pong from L1\n")
    vm.g.wait_until("grep -q 'pong from L1' /tmp/vv-reply", "the host's reply")


def test_nic_on_the_passed_tap(vm: Machine) -> None:
    assert vm.g.check("cat /sys/class/net/eth0/address").strip() == "0e:90:df:9f:a8:88"
    vm.g.check(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
    p = vm.ns.run("busybox", "ping", "-c", "3", "-W", "5", GUEST_IP)
    assert p.returncode == 0, p.stdout + p.stderr


def test_shell_on_the_debug_console(vm: Machine) -> None:
    got = guest.console_shell(vm.dir / "console.socket", "echo kata-$((6 * 7)) on $(tty)", b"kata-42")
    assert b"kata-42 on /dev/hvc0" in got


def test_kata_block_hotplug_seen_by_linux(vm: Machine) -> None:
    qmp = Govmm(vm.dir / "qmp.socket")
    try:
        drive = "drive-kata-volume"
        assert qmp.execute("blockdev-add", driver="raw", **{"node-name": drive, "read-only": False},
                           file={"aio": "native", "driver": "file",
                                 "filename": str(vm.dir / "volume.img")}) == {"return": {}}
        assert qmp.execute("device_add", addr="1", drive=drive, driver="virtio-blk-mmio", id=drive,
                           romfile="") == {"return": {}}
        vm.g.wait_until("[ $(cat /sys/block/vdb/size) -gt 0 ]", "vdb's new capacity")
        assert vm.g.check("mkdir -p /v && mount /dev/vdb /v && cat /v/hello.txt && umount /v") == HOTPLUGGED
        assert qmp.execute("device_del", id=drive) == {"return": {}}
        assert [(e["event"], e["data"]["device"]) for e in qmp.events] == [("DEVICE_DELETED", drive)]
        vm.g.wait_until("[ $(cat /sys/block/vdb/size) -eq 0 ]", "vdb emptied")
        threads = qmp.execute("query-cpus")["return"]
        assert [c["CPU"] for c in threads] == [0, 1] and all(c["thread_id"] > 0 for c in threads)
    finally:
        with contextlib.suppress(Exception):
            qmp.close()


def test_shared_directory_through_virtiofs(vm: Machine) -> None:
    """What Kata's agent does with kataShared, and what a container then does in it."""
    vm.g.check(f"mkdir -p {SHARED} && mount -t virtiofs kataShared {SHARED}")
    assert vm.g.check(f"cat {SHARED}/from-host.txt") == "written on the host\n"
    vm.g.check(f"echo written in the guest > {SHARED}/new.txt && mv {SHARED}/new.txt {SHARED}/renamed.txt "
               f"&& rm {SHARED}/from-host.txt && mkdir {SHARED}/dir && sync")
    shared = vm.dir / "shared"
    assert sorted(p.name for p in shared.iterdir()) == ["dir", "renamed.txt"]
    assert (shared / "renamed.txt").read_text() == "written in the guest\n"
    (shared / "dir" / "later.txt").write_text("the host again\n")     # cache=none: seen at once
    assert vm.g.check(f"cat {SHARED}/dir/later.txt") == "the host again\n"
    blob = vm.g.check(f"dd if=/dev/urandom of={SHARED}/blob bs=64k count=32 2>/dev/null && "
                      f"md5sum {SHARED}/blob")
    assert hashlib.md5((shared / "blob").read_bytes()).hexdigest() == blob.split()[0]


def test_virtiofsd_death_stops_only_its_device(vm: Machine) -> None:
    vm.virtiofsd.send_signal(signal.SIGKILL)
    vm.virtiofsd.wait()
    vm.g.check(f"ping -c 1 -W 5 {HOST_IP}", timeout=60)             # the VM and its other devices run on
    assert vm.g.check("cat /sys/class/misc/hw_random/rng_current").strip().startswith("virtio_rng")
    assert "virtio-fs0: the vhost-user back end at" in (vm.dir / "serial.log").read_text()
    assert "went away; the device needs a reset" in (vm.dir / "serial.log").read_text()
