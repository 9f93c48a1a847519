"""Hot-plug through QMP, seen from both sides: the legacy qemu.qmp client plugs
and unplugs, and the probe guest's hotplug shell (driven over the serial
console) shows what the guest finds in its slots."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt.backends import BackendError
from altovirt.backends.blockfile import BlockFile

from .conftest import PROBE_KERNEL, Vm, needs_kvm
from .netns import NetNs, needs_netns

pytestmark = needs_kvm

MiB = 1 << 20


def image(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(bytes((i * 31 + seed) & 0xFF for i in range(4096)) + bytes(size - 4096))
    return path


def pattern(slot: int) -> bytes:
    """What the probe's "rw" writes at sector 8 of disk slot ``slot``."""
    return bytes((j * 11 + 5 + slot) & 0xFF for j in range(4096))


class Session:
    """A VM running the probe's hotplug shell, and a QMP connection to it."""

    def __init__(self, vm: Vm, sock: Path) -> None:
        self.vm = vm
        vm.wait_line("probe: hotplug ready blk=6 net=2")
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.qmp.connect()

    def ok(self, command: str, **args: object) -> None:
        reply = self.qmp.cmd_obj({"execute": command, "arguments": args})
        assert reply == {"return": {}}, reply

    def error(self, command: str, **args: object) -> str:
        reply = self.qmp.cmd_obj({"execute": command, "arguments": args})
        # QEMU's classes: a device_del of what is not plugged is DeviceNotFound, the rest generic.
        not_found = command == "device_del" and reply["error"]["desc"].endswith("not found")
        assert reply["error"]["class"] == ("DeviceNotFound" if not_found else "GenericError"), reply
        return str(reply["error"]["desc"])

    def shell(self, command: str, reply: str) -> str:
        self.vm.type(command)
        return self.vm.line(f"probe: {reply}")

    def scan(self) -> list[str]:
        self.vm.type("scan")
        lines = [self.vm.line("probe: slot ") for _ in range(8)]
        return [ln.removeprefix("probe: slot ") for ln in lines]

    def close(self) -> None:
        self.vm.type("quit")
        self.vm.wait_line("probe: done ok")
        self.qmp.close()


@pytest.fixture
def disks(probe: Path, tmp_path: Path, vms: list[Vm]) -> Iterator[tuple[Session, Path]]:
    sock = tmp_path / "qmp.sock"
    root = image(tmp_path / "root.img", MiB, 0)
    vm = Vm("-kernel", str(probe / PROBE_KERNEL), "-drive", f"id=rootfs,file={root}",
            "-append", "probe.run=hotplug", "-serial", "stdio", "-api-channel", f"unix:{sock}")
    vms.append(vm)
    s = Session(vm, sock)
    yield s, tmp_path
    s.close()


def test_disk_plugged_used_and_unplugged(disks: tuple[Session, Path]) -> None:
    s, tmp = disks
    slots = s.scan()
    assert slots[0] == "blk0 capacity=2048 gen=0"
    assert slots[1:6] == [f"blk{i} capacity=0 gen=0" for i in range(1, 6)]
    assert [ln.split(" mac=")[0] for ln in slots[6:]] == ["net0 link=down", "net1 link=down"]
    # The guest drives the empty slot 1: a disk of no sectors.
    assert s.shell("rw 1", "rw blk1").startswith("probe: rw blk1 capacity=0 read=ioerr crc=")
    assert s.vm.seen[-1].endswith(" write=ioerr flush=ioerr readback=ioerr")

    data = image(tmp / "data.img", 2 * MiB, 7)
    s.ok("blockdev-add", **{"node-name": "drive-1", "file": {"driver": "file", "filename": str(data)},
                            "cache": {"direct": True}, "read-only": False})
    s.ok("device_add", id="drive-1", driver="virtio-blk-mmio", addr="0x1")
    assert s.shell("wait", "config-change") == "probe: config-change blk1"
    assert s.scan()[1] == "blk1 capacity=4096 gen=1"
    crc = zlib.crc32(data.read_bytes()[:4096])
    assert s.shell("rw 1", "rw blk1") == (f"probe: rw blk1 capacity=4096 read=ok crc={crc:#x} write=ok "
                                          "flush=ok readback=ok")
    assert data.read_bytes()[4096:8192] == pattern(1)         # flushed to the host file
    with pytest.raises(BackendError):                       # held, as QEMU holds it
        BlockFile(str(data), read_only=False, direct=False)

    s.qmp.clear_events()
    s.ok("device_del", id="drive-1")
    # DEVICE_DELETED came before the reply (the legacy client read it on the way).
    assert [(e["event"], e["data"]) for e in s.qmp.get_events()] == \
        [("DEVICE_DELETED", {"device": "drive-1", "path": "drive-1"})]
    assert s.shell("wait", "config-change") == "probe: config-change blk1"
    assert s.shell("rw 1", "rw blk1").startswith("probe: rw blk1 capacity=0 read=ioerr")
    assert data.read_bytes()[4096:8192] == pattern(1)       # the failed write changed nothing
    s.ok("blockdev-del", **{"node-name": "drive-1"})
    BlockFile(str(data), read_only=False, direct=False).close()     # released
    # The boot disk works throughout.
    root_crc = zlib.crc32((tmp / "root.img").read_bytes()[:4096])
    assert s.shell("rw 0", "rw blk0").endswith(f"read=ok crc={root_crc:#x} write=ok flush=ok readback=ok")

    # A plugged disk stays plugged across a system reset, as in QEMU.
    s.ok("blockdev-add", **{"node-name": "drive-3", "file": {"driver": "file", "filename": str(data)}})
    s.ok("device_add", id="drive-3", driver="virtio-blk-mmio", addr="0x3")
    s.ok("system_reset")
    s.vm.wait_line("probe: hotplug ready blk=6 net=2")
    assert [ln.split(" gen=")[0] for ln in s.scan()[:4]] == \
        ["blk0 capacity=2048", "blk1 capacity=0", "blk2 capacity=0", "blk3 capacity=4096"]
    assert s.shell("rw 3", "rw blk3").endswith("write=ok flush=ok readback=ok")


def test_disk_errors_change_nothing(disks: tuple[Session, Path]) -> None:
    s, tmp = disks
    before = s.scan()

    def file(name: str) -> dict[str, str]:
        return {"driver": "file", "filename": str(tmp / name)}

    assert "is already open as node 'rootfs' (the boot disk)" in \
        s.error("blockdev-add", **{"node-name": "d", "file": file("root.img")})
    assert "No such file or directory" in s.error("blockdev-add", **{"node-name": "d", "file": file("nope")})
    assert s.error("blockdev-add", **{"node-name": "d", "file": file("root.img"), "bogus": 1}) == \
        "Parameter 'bogus' is unexpected"
    assert s.error("blockdev-add", **{"node-name": "d", "file": {"driver": "file", "filename": 5}}) == \
        "Invalid parameter type for 'file.filename', expected: string"      # QEMU's words
    assert "invalid id" in s.error("blockdev-add", **{"node-name": "a b", "file": file("root.img")})
    image(tmp / "a.img", MiB, 1)
    s.ok("blockdev-add", **{"node-name": "a", "file": file("a.img")})
    assert s.error("blockdev-add", **{"node-name": "a", "file": file("a.img")}) == \
        "node-name 'a' is already in use"
    assert "no block node named 'b'" in s.error("device_add", id="b", driver="virtio-blk-mmio")
    assert s.error("device_add", id="a", driver="virtio-blk-mmio", addr="0x0") == \
        "disk slot 0 is in use by 'rootfs'"
    assert "does not exist" in s.error("device_add", id="a", driver="virtio-blk-mmio", addr="0x6")
    assert "Invalid addr" in s.error("device_add", id="a", driver="virtio-blk-mmio", addr="one")
    assert "expects one of" in s.error("device_add", id="a", driver="virtio-scsi")
    assert "mac" in s.error("device_add", id="a", driver="virtio-blk-mmio", mac="52:54:00:00:00:01")
    assert s.error("device_del", id="a") == "Device 'a' not found"
    assert s.scan() == before

    # lun 0 is vdb (slot 1); then the other four slots fill up, and a seventh disk has no room.
    s.ok("device_add", id="a", driver="virtio-blk-mmio", lun=0)
    for i in range(2, 6):
        image(tmp / f"{i}.img", MiB, i)
        s.ok("blockdev-add", **{"node-name": f"d{i}", "file": file(f"{i}.img"), "read-only": True})
        s.ok("device_add", id=f"d{i}", driver="virtio-blk-mmio")
    image(tmp / "7.img", MiB, 7)
    s.ok("blockdev-add", **{"node-name": "d7", "file": file("7.img")})
    assert s.error("device_add", id="d7", driver="virtio-blk-mmio") == "all 6 disk slots are in use"
    assert [ln.split(" gen=")[0] for ln in s.scan()[:6]] == ["blk0 capacity=2048"] + \
        [f"blk{i} capacity=2048" for i in range(1, 6)]
    # A read-only disk plugged into a running slot answers writes with an error.
    crc = zlib.crc32((tmp / "2.img").read_bytes()[:4096])
    assert s.shell("rw 2", "rw blk2").endswith(f"read=ok crc={crc:#x} write=ioerr flush=ok readback=mismatch")


def _open_tap_in(netns: str, name: str) -> int:
    """A tap fd opened inside ``netns`` (setns moves only the calling thread, so use one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[int] = []

    def opener() -> None:
        with open(f"/run/netns/{netns}") as ns:
            assert libc.setns(ns.fileno(), 0x40000000) == 0, os.strerror(ctypes.get_errno())  # CLONE_NEWNET
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000 | 0x4000))
        result.append(fd)

    t = threading.Thread(target=opener)
    t.start()
    t.join()
    return result[0]


@needs_netns
def test_nic_plugged_by_name_and_by_fd(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    ns = NetNs(("tap0", "tap1"))
    try:
        sock = tmp_path / "qmp.sock"
        vm = Vm("-kernel", str(probe / PROBE_KERNEL), "-append", "probe.run=hotplug", "-serial", "stdio",
                "-api-channel", f"unix:{sock}", prefix=tuple(ns.cmd()))
        vms.append(vm)
        s = Session(vm, sock)
        mac0 = s.scan()[6].split(" mac=")[1]
        # An empty slot: the link is down and frames go nowhere.
        assert s.shell("net 0", "net0") == "probe: net0 link=down send=ok echo=timeout"

        s.ok("netdev_add", id="net-0", ifname="tap0")
        assert "in use by another process" in s.error("netdev_add", id="net-x", ifname="tap0")
        assert "does not exist" in s.error("netdev_add", id="net-x", ifname="tap9")
        assert "one of them" in s.error("netdev_add", id="net-x")
        s.ok("device_add", id="net-0", driver="virtio-net-mmio", addr="0x0")
        assert s.shell("wait", "config-change") == "probe: config-change net0"
        assert s.scan()[6] == f"net0 link=up mac={mac0}"             # the MAC the guest found at boot
        assert s.shell("net 0", "net0") == "probe: net0 link=up send=ok echo=ok"

        # The second NIC comes as an fd (getfd), with a MAC of its own.
        assert s.error("netdev_add", id="net-1", fd="tapfd") == \
            "File descriptor named 'tapfd' has not been found"
        assert s.error("getfd", fdname="tapfd") == "No file descriptor supplied via SCM_RIGHTS"
        fd = _open_tap_in(ns.name, "tap1")
        s.qmp.send_fd_scm(fd)
        os.close(fd)
        s.ok("getfd", fdname="tapfd")
        s.ok("netdev_add", id="net-1", fd="tapfd")
        s.ok("device_add", id="net-1", driver="virtio-net-mmio", mac="0e:90:df:9f:a8:88")
        assert s.shell("wait", "config-change") == "probe: config-change net1"
        assert s.scan()[7] == "net1 link=up mac=0e:90:df:9f:a8:88"
        assert s.shell("net 1", "net1") == "probe: net1 link=up send=ok echo=ok"
        assert s.error("device_add", id="net-1", driver="virtio-net-mmio") == "Duplicate device ID 'net-1'"

        s.ok("device_del", id="net-0")
        assert s.shell("wait", "config-change") == "probe: config-change net0"
        assert s.shell("net 0", "net0") == "probe: net0 link=down send=ok echo=timeout"
        assert "busy" in s.error("netdev_del", id="net-1")
        s.ok("netdev_del", id="net-0")
        s.ok("netdev_add", id="net-2", ifname="tap0")               # the tap is free again
        s.close()
    finally:
        ns.close()
