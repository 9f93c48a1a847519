"""Snapshots and live migration of the probe guest, driven over QMP as QEMU's users drive
them: a counter in guest RAM carries on, a virtio-blk queue is used across, the serial
port answers, pages the guest keeps writing arrive; every failure leaves the source
running and the destination refusing with one line."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt.snapshot import format as snapfile

from .conftest import Vm, needs_kvm
from .netns import NetNs, needs_netns

pytestmark = needs_kvm

DISK_TEXT = b"the disk's first sector, read before and after"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(DISK_TEXT.ljust(1 << 20, b"\0"))
    return path


def guest_args(probe: Path, disk: Path, *more: str) -> list[str]:
    return ["-kernel", str(probe / "probe.elf"), "-smp", "2", "-append", "probe.run=snapshot",
            "-serial", "stdio", "-drive", f"id=disk0,file={disk}", *more]


# Every QMP client a test opened, closed after it: one left to the garbage collector is closed
# in the middle of a later test's event loop, which qemu.qmp refuses with an exception.
_clients: list[QEMUMonitorProtocol] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _clients:
        with contextlib.suppress(Exception):    # closed already (quit), or its VMM gone
            client.close()
    _clients.clear()


class Guest:
    """A probe guest running the snapshot test, and its QMP monitor (qemu.qmp's legacy client)."""

    def __init__(self, vms: list[Vm], args: list[str], sock: Path, *, ready: bool = True,
                 prefix: tuple[str, ...] = ()) -> None:
        self.vm = Vm(*args, "-api-channel", f"unix:{sock}", prefix=prefix)
        vms.append(self.vm)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.vm.proc.poll() is None and time.monotonic() < deadline, "the VMM did not start"
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(sock))
        _clients.append(self.qmp)
        self.qmp.connect(negotiate=True)
        if ready:
            self.vm.wait_line("probe: snap ready")

    def cmd(self, name: str, **args: Any) -> Any:
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        assert "return" in reply, reply
        return reply["return"]

    def error(self, name: str, **args: Any) -> str:
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args})
        assert "error" in reply, reply
        return str(reply["error"]["desc"])

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def ask(self, command: str, answer: str) -> str:
        """Type a command to the guest; its answer line."""
        self.vm.type(command)
        return self.vm.line(f"probe: snap {answer}")

    def count(self) -> int:
        return int(self.ask("count", "count=").split("=")[1])

    def migration_ends(self, timeout: float = 60) -> dict[str, Any]:
        """query-migrate once the migration has ended (MIGRATION events seen on the way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return dict(info)
            time.sleep(0.02)
        raise AssertionError(f"the migration did not end: {info}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.qmp.get_events() if e["event"] == name]

    def quit(self) -> None:
        self.cmd("quit")
        with contextlib.suppress(EOFError):     # qemu.qmp reports the server's close, which quit asked for
            self.qmp.close()
        assert self.vm.finish()[0] == 0

    def exits(self) -> tuple[int, str]:
        """The VMM's exit status and stderr, once it has ended by itself."""
        status, err = self.vm.finish()
        with contextlib.suppress(EOFError):
            self.qmp.close()
        return status, err


def wait_status(guest: Guest, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while guest.status() != status:
        assert time.monotonic() < deadline, f"still {guest.status()}, never {status}"
        time.sleep(0.02)


def snapshot(guest: Guest, directory: Path) -> dict[str, Any]:
    guest.cmd("stop")
    guest.cmd("migrate", uri=f"file:{directory}")
    info = guest.migration_ends()
    assert info["status"] == "completed", info
    return info


# --- snapshots ---

def ram_mapping(pid: int) -> str:
    """What backs the VMM's guest RAM (its biggest mapping), from /proc/<pid>/maps."""
    def size(line: str) -> int:
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        return end - start
    with open(f"/proc/{pid}/maps") as f:
        biggest = max(f.read().splitlines(), key=size)
    return " ".join(biggest.split()[5:])


@pytest.mark.parametrize("mem, share", [("map", "off"), ("copy", "off"), ("map", "on")])
def test_snapshot_and_restore(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm], mem: str,
                              share: str) -> None:
    """Also with shared RAM (mem-share=on, for vhost-user back ends): it stays the memfd the
    back end would map, the snapshot's memory read into it."""
    machine = ("-machine", f"mem-share={share}")
    source = Guest(vms, guest_args(probe, disk, *machine), tmp_path / "q1.sock")
    assert ram_mapping(source.vm.proc.pid) == ("/memfd:altovirt-ram (deleted)" if share == "on" else "")
    before = source.count()
    first_read = source.ask("blk", "blk")
    assert "read=ok" in first_read
    info = snapshot(source, tmp_path / "snap")
    assert [e["data"]["status"] for e in source.events("MIGRATION")] == ["setup", "active", "completed"]
    assert source.status() == "paused"         # a snapshot leaves the source as it was
    assert info["ram"]["total"] == 256 << 20
    memory = os.stat(tmp_path / "snap" / "memory")
    assert memory.st_blocks * 512 < (64 << 20)     # zero pages are holes: mostly empty RAM costs little
    source.cmd("cont")                          # and it goes on
    assert source.count() > before
    source.quit()

    incoming = ("-incoming", f"file:{tmp_path / 'snap'},mem={mem}")
    restored = Guest(vms, guest_args(probe, disk, *machine, *incoming), tmp_path / "q2.sock", ready=False)
    wait_status(restored, "paused")             # loaded, waiting for cont
    if share == "on":
        assert ram_mapping(restored.vm.proc.pid) == "/memfd:altovirt-ram (deleted)"
    assert restored.cmd("query-migrate")["status"] == "completed"
    restored.cmd("cont")
    after = restored.count()
    assert after > before                       # the counter in RAM carried on from the snapshot
    assert restored.ask("blk", "blk") == first_read     # the disk's queue, where the driver left it
    restored.vm.type("quit")
    restored.vm.wait_line("probe: done ok")
    assert restored.vm.finish()[0] == 0
    assert not any(line.startswith("probe: boot") for line in restored.vm.seen)     # no boot: a restore


@needs_netns
def test_clones_get_new_vm_generation_ids(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """Each VM started from one snapshot has a GUID of its own, in guest RAM where the DSDT
    says and as QMP reports it; each clone has its own copy of the disk and its own tap
    (the NIC comes back with the snapshot's MAC on it)."""
    netns = NetNs(("tap0", "tap1", "tap2"))
    try:
        clones(probe, disk, tmp_path, vms, netns)
    finally:
        netns.close()


def clones(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm], netns: NetNs) -> None:
    prefix = tuple(netns.cmd())
    source = Guest(vms, guest_args(probe, disk, "-netdev", "id=n0,netdev=tap0"), tmp_path / "q1.sock",
                   prefix=prefix)
    ids = {source.cmd("query-vm-generation-id")["guid"]}
    assert guest_vmgenid(source) == ids
    snapshot(source, tmp_path / "snap")
    source.quit()
    for n in range(2):
        copy = tmp_path / f"disk{n}.img"
        copy.write_bytes(disk.read_bytes())
        clone = Guest(vms, guest_args(probe, copy, "-netdev", f"id=n0,netdev=tap{n + 1}",
                                      "-incoming", f"file:{tmp_path / 'snap'},resume=on"),
                      tmp_path / f"c{n}.sock", ready=False, prefix=prefix)
        wait_status(clone, "running")
        guid = clone.cmd("query-vm-generation-id")["guid"]
        assert guest_vmgenid(clone) == {guid} and guid not in ids
        ids.add(guid)
        clone.quit()


# Prints each RARP frame that reaches the tap argv[1] (time and bytes), ending after argv[2]
# of them or 10 s of silence. The time is when the kernel received it (SO_TIMESTAMPNS), so that
# the capture's own scheduling delays do not show as the announcer's.
RARP_CAPTURE = """
import socket, struct, sys
SO_TIMESTAMPNS = 35
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.bind((sys.argv[1], 0))
s.settimeout(10)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    try:
        frame, ancillary, _, _ = s.recvmsg(2048, socket.CMSG_SPACE(16))
    except TimeoutError:
        break
    sec, nsec = next(struct.unpack("qq", data) for level, kind, data in ancillary
                     if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS)
    print(f"{sec + nsec / 1e9:.6f} {frame.hex()}", flush=True)
"""


@needs_netns
def test_a_loaded_vm_announces_its_nic(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """Once a VM loaded from a snapshot runs, its NIC announces itself on its tap as QEMU's
    does after a migration: 5 broadcast RARP requests for its MAC, 50 ms apart and then further,
    so that bridges and switches learn the guest's new port before it sends anything."""
    netns = NetNs(("tap0", "tap1"))
    try:
        prefix = tuple(netns.cmd())
        source = Guest(vms, guest_args(probe, disk, "-netdev", "id=n0,netdev=tap0"), tmp_path / "q1.sock",
                       prefix=prefix)
        snapshot(source, tmp_path / "snap")
        source.quit()
        capture = subprocess.Popen(netns.cmd(sys.executable, "-c", RARP_CAPTURE, "tap1", "6"),
                                   stdout=subprocess.PIPE, text=True)
        assert capture.stdout is not None and capture.stdout.readline() == "ready\n"
        clone = Guest(vms, guest_args(probe, disk, "-netdev", "id=n0,netdev=tap1",
                                      "-incoming", f"file:{tmp_path / 'snap'},resume=on"),
                      tmp_path / "c.sock", ready=False, prefix=prefix)
        wait_status(clone, "running")
        out, _ = capture.communicate(timeout=30)
        clone.quit()
    finally:
        netns.close()
    frames = [(float(t), bytes.fromhex(f)) for t, f in (line.split() for line in out.splitlines())]
    assert len(frames) == 5, out                        # five rounds, and no more
    mac = frames[0][1][6:12]
    for _, f in frames:
        assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x80\x35"
        # hardware Ethernet, protocol IPv4, lengths 6 and 4, "request reverse", sender = target = MAC
        assert f[14:22] == bytes.fromhex("0001080006040003") and f[22:28] == f[32:38] == mac
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    assert gaps[0] >= 0.04 and all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps


def guest_vmgenid(guest: Guest) -> set[str]:
    """The GUID the guest reads at the address its ACPI tables give, as text."""
    raw = bytes.fromhex(guest.ask("vmgenid", "vmgenid=").split("=")[1])
    return {str(uuid.UUID(bytes_le=raw))}


@pytest.mark.skipif(shutil.which("xenstore-write") is None,
                    reason="SKIPPED LOUDLY: Debian's xenstore-utils is missing (scripts/setup installs it)")
def test_the_xenstore_comes_along(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """What the host wrote into the VM's XenStore (Xen's own tools) is in the restored VM's."""
    def xs(sock: Path, *args: str) -> str:
        return subprocess.run(args, env=dict(os.environ, XENSTORED_PATH=str(sock)), capture_output=True,
                              text=True, check=True, timeout=30).stdout

    source = Guest(vms, guest_args(probe, disk, "-xenstore", str(tmp_path / "xs1.sock")),
                   tmp_path / "q1.sock")
    xs(tmp_path / "xs1.sock", "xenstore-write", "/vm/name", "web-1", "/local/domain/1/data/x", "y")
    snapshot(source, tmp_path / "snap")
    source.quit()
    restored = Guest(vms, guest_args(probe, disk, "-xenstore", str(tmp_path / "xs2.sock"),
                                     "-incoming", f"file:{tmp_path / 'snap'},resume=on"),
                     tmp_path / "q2.sock", ready=False)
    wait_status(restored, "running")
    assert xs(tmp_path / "xs2.sock", "xenstore-read", "/vm/name", "/local/domain/1/data/x") == "web-1\ny\n"
    restored.quit()
    # A VM without a XenStore cannot take the snapshot of one that had it.
    vm = Vm(*guest_args(probe, disk, "-incoming", f"file:{tmp_path / 'snap'}",
                        "-api-channel", f"unix:{tmp_path / 'q3.sock'}"))
    vms.append(vm)
    status, err = vm.finish()
    assert status == 1 and "section xenstore: saved, but this VM has no -xenstore" in err


def test_restore_can_resume_at_once(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    snapshot(source, tmp_path / "snap")
    source.quit()
    restored = Guest(vms, guest_args(probe, disk, "-incoming", f"file:{tmp_path / 'snap'},resume=on"),
                     tmp_path / "q2.sock", ready=False)
    wait_status(restored, "running")
    assert restored.count() > 0
    restored.quit()


def test_restored_vm_reads_its_kernel_to_reboot(probe: Path, disk: Path, tmp_path: Path,
                                                vms: list[Vm]) -> None:
    """A VM loaded from a snapshot boots nothing; system_reset reads the kernel then, and while
    the kernel is missing it refuses, saying so, and the guest runs on."""
    kernel = tmp_path / "vmlinux"
    shutil.copy(probe / "probe.elf", kernel)
    args = ["-kernel", str(kernel), *guest_args(probe, disk)[2:]]
    source = Guest(vms, args, tmp_path / "q1.sock")
    snapshot(source, tmp_path / "snap")
    source.quit()
    kernel.rename(tmp_path / "elsewhere")
    restored = Guest(vms, [*args, "-incoming", f"file:{tmp_path / 'snap'},resume=on"], tmp_path / "q2.sock",
                     ready=False)
    wait_status(restored, "running")
    assert "cannot boot again: -kernel: " in restored.error("system_reset")
    assert restored.count() > 0
    (tmp_path / "elsewhere").rename(kernel)
    assert restored.cmd("system_reset") == {}
    restored.vm.wait_line("probe: snap ready")        # the kernel booted from its start
    restored.quit()


def test_deferred_incoming(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """-incoming defer: the process starts and waits; migrate-incoming loads the VM."""
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    snapshot(source, tmp_path / "snap")
    source.quit()
    waiting = Guest(vms, guest_args(probe, disk, "-incoming", "defer"), tmp_path / "q2.sock", ready=False)
    assert waiting.status() == "inmigrate"
    assert "inmigrate" in waiting.error("device_del", id="disk0")     # nothing changes before the load
    assert waiting.cmd("cont") == {}            # as QEMU: it runs once loaded (autostart)
    assert waiting.status() == "inmigrate"
    assert waiting.cmd("migrate-incoming", uri=f"file:{tmp_path / 'snap'}") == {}
    wait_status(waiting, "running")
    again = waiting.error("migrate-incoming", uri=f"file:{tmp_path / 'snap'}")
    assert again == "the VM is running, not inmigrate"
    assert waiting.count() > 0
    waiting.quit()


def test_stop_while_loading_takes_back_cont(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """'stop' after 'cont' while the VM waits for its state: it comes up paused (as QEMU)."""
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    snapshot(source, tmp_path / "snap")
    source.quit()
    waiting = Guest(vms, guest_args(probe, disk, "-incoming", "defer"), tmp_path / "q2.sock", ready=False)
    assert waiting.cmd("cont") == {} and waiting.cmd("stop") == {}
    assert waiting.cmd("migrate-incoming", uri=f"file:{tmp_path / 'snap'}") == {}
    wait_status(waiting, "paused")
    time.sleep(0.2)
    assert waiting.status() == "paused"
    waiting.quit()


def test_snapshot_needs_a_paused_vm(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    guest = Guest(vms, guest_args(probe, disk), tmp_path / "q.sock")
    assert guest.error("migrate", uri=f"file:{tmp_path / 'snap'}") == "the VM is running, not paused"
    assert "unsupported URI 'exec:cat'; accepted: file:DIR, tcp:HOST:PORT or unix:PATH" in \
        guest.error("migrate", uri="exec:cat")
    assert "port in [1, 65535]" in guest.error("migrate", uri="tcp:127.0.0.1:99999")
    assert "range of 0 to" in guest.error("migrate-set-parameters", **{"downtime-limit": -1})
    assert guest.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]) == {}
    assert "'postcopy-ram' is not supported" in guest.error(
        "migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    assert guest.cmd("query-migrate") == {}
    assert not (tmp_path / "snap").exists()
    guest.quit()


# --- bad snapshots: refused with one line naming the section, nothing starts ---

def _corrupt_section(state: bytes) -> bytes:
    at = state.index(b"virtio-mmio.0") + len("virtio-mmio.0") + 20     # into the payload
    return state[:at] + bytes([state[at] ^ 0xFF]) + state[at + 1:]


def _other_version(state: bytes) -> bytes:
    return state[:8] + (99).to_bytes(4, "little") + state[12:]


def with_header(state: bytes, change: Callable[[dict[str, Any]], dict[str, Any]]) -> bytes:
    """The state with its header as ``change`` makes it (its CRC redone)."""
    head_len = int.from_bytes(state[12:16], "little")
    new = json.dumps(change(json.loads(state[16:16 + head_len]))).encode()
    return (state[:12] + len(new).to_bytes(4, "little") + new + zlib.crc32(new).to_bytes(4, "little")
            + state[16 + head_len + 4:])


def _other_machine(state: bytes) -> bytes:
    """The state as an arm64 host would have saved it: the header says so."""
    return with_header(state, lambda head: {**head, "machine": "aarch64"})


BAD: list[tuple[str, Callable[[Path], object], list[str], str]] = [
    ("truncated", lambda d: (d / "state").write_bytes((d / "state").read_bytes()[:-40]), [],
     r"state: truncated in section \S+$"),
    ("corrupt", lambda d: (d / "state").write_bytes(_corrupt_section((d / "state").read_bytes())), [],
     r"state: section virtio-mmio.0 is corrupt \(CRC mismatch\)$"),
    ("version", lambda d: (d / "state").write_bytes(_other_version((d / "state").read_bytes())), [],
     r"state: snapshot format 99; this AltoVirt reads 1$"),
    ("memory-gone", lambda d: (d / "memory").unlink(), [], r"memory: No such file or directory$"),
    ("other-memory", lambda d: (d / "memory").write_bytes(bytes(256 << 20) + b"AVSNAP\r\n" + bytes(16)), [],
     r"memory: belongs to another snapshot$"),
    ("ram-size", lambda d: None, ["-m", "512M"],
     r"header: 268435456 bytes of RAM saved; this VM has 536870912"),
    ("vcpus", lambda d: None, ["-smp", "1"], r"header: 2 vCPUs saved; this VM has 1 \(-smp\)$"),
    ("machine", lambda d: (d / "state").write_bytes(_other_machine((d / "state").read_bytes())), [],
     r"header: saved on an aarch64 host; this x86_64 host cannot run it$"),
]


@pytest.mark.parametrize("name, damage, config, problem", BAD, ids=[b[0] for b in BAD])
def test_bad_snapshot_is_refused(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm], name: str,
                                 damage: Callable[[Path], object], config: list[str], problem: str) -> None:
    directory = tmp_path / "snap"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    snapshot(source, directory)
    source.quit()
    damage(directory)
    args = guest_args(probe, disk, "-incoming", f"file:{directory}") + config
    if config[:1] == ["-smp"]:
        args[args.index("-smp") + 1] = config[1]
        args = args[:-2]
    vm = Vm(*args)
    vms.append(vm)
    status, err = vm.finish()
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(problem, lines[0]), lines[0]
    assert lines[0].startswith(f"altovirt: error: -incoming file:{directory}: ")
    assert not any(line.startswith("probe: snap") for line in vm.seen)        # the guest never ran


def test_missing_backend_is_refused(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """A hot-plugged disk's image is saved by path: gone, the snapshot cannot be taken up."""
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(1 << 20))
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    source.cmd("blockdev-add", **{"node-name": "extra", "file": {"driver": "file", "filename": str(extra)}})
    source.cmd("device_add", driver="virtio-blk-mmio", id="extra")
    snapshot(source, tmp_path / "snap")
    source.quit()
    extra.unlink()
    vm = Vm(*guest_args(probe, disk, "-incoming", f"file:{tmp_path / 'snap'}",
                        "-api-channel", f"unix:{tmp_path / 'q2.sock'}"))
    vms.append(vm)
    status, err = vm.finish()
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "section hotplug: a saved backend cannot be opened: " in err and "extra.img" in err
    # Without the QMP channel the VM has no hot-plug slots for the saved ones.
    vm = Vm(*guest_args(probe, disk, "-incoming", f"file:{tmp_path / 'snap'}"))
    vms.append(vm)
    status, err = vm.finish()
    assert status == 1 and "section virtio-mmio.1: this VM has no such component; a VM with " \
        "-api-channel has hot-plug slots" in err


def test_incoming_usage_errors(probe: Path, disk: Path, tmp_path: Path) -> None:
    from .conftest import run_altovirt
    for option, problem in (("file:/x,mem=lazy", "-incoming: mem='lazy'; accepted: map"),
                            ("ftp:host", "-incoming: unsupported URI 'ftp:host'"),
                            ("tcp:example.com:4444", "HOST must be an IP address or localhost"),
                            ("defer", "-incoming defer: the VM waits for QMP migrate-incoming; give "
                                      "-api-channel too")):
        r = run_altovirt(*guest_args(probe, disk, "-incoming", option))
        assert r.returncode == 2 and problem in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The JSON form says the same things.
    for incoming, problem in (
            ({"uri": "file:/x", "mem": "lazy"}, 'incoming.mem: expected "map" or "copy"'),
            ({"uri": "file:/x", "resume": "yes"}, "incoming.resume: expected true or false"),
            ({"uri": "tcp:1.2.3.4"}, "incoming.uri: 'tcp:1.2.3.4': expected tcp:HOST:PORT")):
        config = tmp_path / "vm.json"
        config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(probe / "probe.elf")},
                                      "incoming": incoming}))
        r = run_altovirt("-config", str(config))
        assert r.returncode == 2 and problem in r.stderr, r.stderr


# --- live migration ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def migrate_live(source: Guest, uri: str) -> dict[str, Any]:
    source.cmd("migrate", uri=uri)
    return source.migration_ends()


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm], transport: str,
                        deferred: bool) -> None:
    """``deferred``: the destination starts with -incoming defer and listens once QMP's
    migrate-incoming asks, its sandbox on (it was killed for the listen, and for the tcp URI)."""
    uri = f"unix:{tmp_path / 'mig.sock'}" if transport == "unix" else f"tcp:127.0.0.1:{free_port()}"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    source.ask("dirty 4096", "dirty")           # 16 MiB the guest keeps rewriting
    before = source.count()
    first_read = source.ask("blk", "blk")
    # The destination opens the same disk: it takes the image's locks once the source lets go.
    incoming = "defer" if deferred else uri
    dest = Guest(vms, guest_args(probe, disk, "-incoming", incoming), tmp_path / "q2.sock", ready=False)
    assert dest.status() == "inmigrate"
    if deferred:
        assert dest.cmd("migrate-incoming", uri=uri) == {}
    source.cmd("migrate-set-parameters", **{"downtime-limit": 200, "max-bandwidth": 0})
    info = migrate_live(source, uri)
    assert info["status"] == "completed", info
    assert 0 < info["downtime"] <= 200 and info["ram"]["transferred"] > 16 << 20
    assert source.status() == "postmigrate"
    assert [e["data"]["status"] for e in source.events("MIGRATION")][-1] == "completed"
    wait_status(dest, "paused")
    dest.cmd("cont")
    assert dest.ask("verify", "verify").startswith("probe: snap verify=ok pages=4096")   # every page arrived
    assert dest.count() > before
    assert dest.ask("blk", "blk") == first_read
    # The same VM goes on: its generation ID too.
    assert dest.cmd("query-vm-generation-id") == source.cmd("query-vm-generation-id")
    assert "in use by another process" in source.error("cont")     # the destination has the disk now
    source.quit()
    dest.quit()


def test_live_migration_in_passes(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """A guest rewriting more than the downtime limit allows at the bandwidth cap: pass after
    pass (MIGRATION_PASS), then the last copy with the guest stopped, and nothing lost."""
    uri = f"unix:{tmp_path / 'mig.sock'}"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    source.ask("dirty 64", "dirty")
    dest = Guest(vms, guest_args(probe, disk, "-incoming", f"{uri},resume=on"), tmp_path / "q2.sock",
                 ready=False)
    source.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 64 << 20})
    assert source.cmd("query-migrate-parameters") == {"max-bandwidth": 64 << 20, "downtime-limit": 1}
    started = time.monotonic()
    info = migrate_live(source, uri)
    assert info["status"] == "completed", info
    assert time.monotonic() - started > 0.9 * info["ram"]["transferred"] / (64 << 20)    # the cap holds
    passes = source.events("MIGRATION_PASS")
    # At least one pass after the first: a guest the host starves of CPU dirties fewer pages
    # in a pass, so the copy may converge a pass earlier (1 run in 8 beside a CPU hog).
    assert len(passes) >= 1 and info["ram"]["dirty-sync-count"] == len(passes) + 1
    wait_status(dest, "running")
    assert dest.ask("verify", "verify").startswith("probe: snap verify=ok pages=64")
    source.quit()
    dest.quit()


def test_cancel_leaves_the_source_running(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    # 16 MiB the guest keeps rewriting, at 4 MiB/s: the migration cannot converge before the
    # cancel (without it, the few pages the probe touched went in a second, cancel or not).
    source.ask("dirty 4096", "dirty")
    dest = Guest(vms, guest_args(probe, disk, "-incoming", uri), tmp_path / "q2.sock", ready=False)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})     # slow: time to cancel
    source.cmd("migrate", uri=uri)
    time.sleep(0.5)
    assert "already in progress" in source.error("migrate", uri=uri)
    assert "migration is in progress" in source.error("device_del", id="disk0")
    source.cmd("migrate_cancel")
    assert source.migration_ends()["status"] == "cancelled"
    assert source.status() == "running"
    before = source.count()
    assert source.count() > before
    assert "read=ok" in source.ask("blk", "blk")        # its disk is still its own
    status, err = dest.exits()                         # the destination gives up: nothing starts
    # The source's cancel closes the stream: EOF or a reset, as the kernel has it, one message.
    assert status == 1 and "the connection was lost (" in err and len(err.strip().splitlines()) == 1
    source.quit()


def test_lost_destination_leaves_the_source_running(probe: Path, disk: Path, tmp_path: Path,
                                                     vms: list[Vm]) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    # 16 MiB rewritten all the while, 4 MiB/s allowed: the copy cannot end before the kill,
    # however late a busy host runs it.
    source.ask("dirty 4096", "dirty")
    dest = Guest(vms, guest_args(probe, disk, "-incoming", uri), tmp_path / "q2.sock", ready=False)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    source.cmd("migrate", uri=uri)
    time.sleep(0.5)
    dest.vm.proc.kill()
    dest.exits()
    info = source.migration_ends()
    assert info["status"] == "failed" and "connection" in info["error-desc"]
    assert source.status() == "running"
    assert "read=ok" in source.ask("blk", "blk")
    source.quit()


def test_destination_refuses_another_machine(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    dest = Vm(*guest_args(probe, disk, "-incoming", uri, "-m", "512M"))
    vms.append(dest)
    deadline = time.monotonic() + 20
    while not (tmp_path / "mig.sock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    info = migrate_live(source, uri)
    assert info["status"] == "failed", info
    assert source.status() == "running"
    status, err = dest.finish()
    assert status == 1 and "268435456 bytes of RAM sent; this VM has 536870912 (-m)" in err
    source.quit()


def test_snapshot_format_of_a_real_vm(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """The header and sections a VM writes: every component, the host CPU, versions."""
    source = Guest(vms, guest_args(probe, disk), tmp_path / "q1.sock")
    snapshot(source, tmp_path / "snap")
    source.quit()
    header, sections = snapfile.read_state(str(tmp_path / "snap"))
    assert header["vcpus"] == 2 and header["memory_size"] == 256 << 20 and header["altovirt"]
    assert header["cpu"]["vendor"] in ("GenuineIntel", "AuthenticAMD")
    assert {"kvm", "serial", "i8042", "rtc", "hotplug", "virtio-mmio.0"} <= set(sections)
    assert all(s.version == 1 for s in sections.values())


def test_pci_machine_snapshot_and_restore(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """A -machine q35 VM's functions are sections of their own (virtio-pci.N); it restores on a
    PCI machine, and a virtio-mmio machine refuses its snapshot in one line."""
    source = Guest(vms, guest_args(probe, disk, "-machine", "q35"), tmp_path / "q1.sock")
    before = source.count()
    snapshot(source, tmp_path / "snap")
    source.quit()
    refused = Vm(*guest_args(probe, disk, "-incoming", f"file:{tmp_path / 'snap'}"))
    vms.append(refused)
    status, err = refused.finish()
    assert status == 1 and "section virtio-pci.0: saved from a VM whose devices are virtio-pci; this VM's " \
        "are virtio-mmio (-machine microvm)" in err, err
    incoming = ("-incoming", f"file:{tmp_path / 'snap'},resume=on")
    restored = Guest(vms, guest_args(probe, disk, "-machine", "q35", *incoming), tmp_path / "q2.sock",
                     ready=False)
    wait_status(restored, "running")
    assert restored.count() > before
    restored.quit()


def test_a_disk_hot_plugged_into_a_root_port_is_saved_with_its_port(probe: Path, disk: Path, tmp_path: Path,
                                                                    vms: list[Vm]) -> None:
    """A disk device_add put into a root port is in the snapshot with the port's own state
    (pcie-root-port.N); a VM started with that disk in that port takes it, one whose port is
    empty refuses it in one line, as QEMU requires the same devices on both sides."""
    hot = tmp_path / "hot.img"
    hot.write_bytes(bytes(1 << 20))
    ports = ("-machine", "q35", "-device", "pcie-root-port,id=rp1,addr=6", "-device",
             "pcie-root-port,id=rp2,addr=7")
    source = Guest(vms, guest_args(probe, disk, *ports), tmp_path / "q1.sock")
    source.cmd("blockdev-add", **{"node-name": "hot", "driver": "raw",
                                  "file": {"driver": "file", "filename": str(hot)}})
    source.cmd("device_add", driver="virtio-blk-pci", id="hot", bus="rp2")
    before = source.count()
    snapshot(source, tmp_path / "snap")
    source.quit()
    incoming = ("-incoming", f"file:{tmp_path / 'snap'},resume=on")
    refused = Vm(*guest_args(probe, disk, *ports, *incoming))
    vms.append(refused)
    status, err = refused.finish()
    assert status == 1 and "section virtio-pci.1: this VM has no such component; give it the devices the " \
        "saved VM had, those hot-plugged into root ports too (-device ...,bus=PORT)" in err, err
    in_port = ("-drive", f"id=hot,file={hot},if=none", "-device", "virtio-blk-pci,drive=hot,id=hot,bus=rp2")
    restored = Guest(vms, guest_args(probe, disk, *ports, *in_port, *incoming), tmp_path / "q2.sock",
                     ready=False)
    wait_status(restored, "running")
    assert restored.count() > before
    assert "already in the process" not in restored.error("device_del", id="disk0")
    restored.cmd("device_del", id="hot")            # the button of the port it is in
    restored.quit()
