"""virtio-balloon, driven in-process as a guest driver drives it: inflated and reported pages go
back to the host (they leave the process's memory and read as zero), statistics are taken and
handed back each polling interval, and malformed buffers are skipped; then its API, Firecracker's
and QMP's. Debian's driver under it is in the nested test bed (tests/linux/test_balloon.py)."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt.arch.x86_64 import layout
from altovirt.config.model import BalloonConfig
from altovirt.devices.virtio.balloon import Balloon
from altovirt.devices.virtio.device import VIRTIO_MMIO_INT_CONFIG, Interrupt
from altovirt.devices.virtio.queue import Queue
from altovirt.eventloop import EventLoop
from altovirt.memory import PAGE_SHIFT, GuestMemory

from .conftest import Vm, needs_kvm
from .fcapi import Firecracker
from .virtq import DriverQueue

MiB = 1 << 20
RAM = 64 * MiB
BUFFERS = 0x100000                      # where the test's buffers are; the rings are below


class Guest:
    """A balloon and the driver's side of its queues, in 64 MiB of RAM."""

    def __init__(self, cfg: BalloonConfig, io: EventLoop) -> None:
        self.mem = GuestMemory(layout.ram_regions(RAM))
        self.changes: list[int] = []
        self.dev = Balloon("balloon", cfg, self.changes.append)
        self.irqfd = os.eventfd(0, os.EFD_NONBLOCK)
        self.drivers, queues = [], []
        for i, size in enumerate(self.dev.queue_sizes):
            drv = DriverQueue(self.mem, 0x10000 * (i + 1), 64)
            q = Queue(size, self.mem)
            q.size, q.desc_addr, q.avail_addr, q.used_addr = 64, drv.desc, drv.avail, drv.used
            q.activate(0)
            self.drivers.append(drv)
            queues.append(q)
        self.interrupt = Interrupt(self.irqfd, lambda reason: None)
        self.dev.activate(self.mem, queues, self.interrupt, io)
        self.io = io
        self.next_buffer = BUFFERS

    def buffer(self, data: bytes) -> int:
        addr = self.next_buffer
        self.mem.write(addr, data)
        self.next_buffer += (len(data) + 0xFFF) & ~0xFFF
        return addr

    def post(self, queue: int, buffers: list[tuple[int, int, bool]]) -> None:
        drv = self.drivers[queue]
        drv.publish(drv.chain(buffers))
        self.io.call_later(0, lambda: self.dev.queue_notify(queue))

    def wait_used(self, queue: int, count: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.drivers[queue].used_idx() < count:
            assert time.monotonic() < deadline, f"queue {queue}: {self.drivers[queue].used_idx()} of {count}"
            time.sleep(0.005)

    def resident(self, gpa: int, length: int) -> int:
        """How many of the pages of [gpa, gpa+length) are in the process's memory."""
        untouched = self.mem.untouched_pages()
        assert untouched is not None
        first = gpa >> PAGE_SHIFT
        pages = length >> PAGE_SHIFT
        return pages - sum(untouched[first:first + pages])

    def close(self) -> None:
        self.dev.reset()
        os.close(self.irqfd)
        self.mem.close()


def test_inflated_pages_go_back_to_the_host(io: EventLoop) -> None:
    g = Guest(BalloonConfig(amount_mib=8), io)
    try:
        assert struct.unpack_from("<II", g.dev.config) == (8 * 256, 0)     # num_pages, actual
        region = 32 * MiB
        g.mem.write(region, b"\xaa" * (8 * MiB))                          # the guest used them
        assert g.resident(region, 8 * MiB) == 2048
        pfns = list(range(region >> PAGE_SHIFT, (region + 8 * MiB) >> PAGE_SHIFT))
        for i in range(0, len(pfns), 256):                                 # as Linux: 256 a buffer
            chunk = pfns[i:i + 256][::-1]                                  # in any order
            g.post(0, [(g.buffer(struct.pack(f"<{len(chunk)}I", *chunk)), 4 * len(chunk), False)])
        g.wait_used(0, 8)
        assert g.resident(region, 8 * MiB) == 0
        assert g.mem.read(region, 16) == bytes(16)
        g.dev.write_config(4, 4, 2048)                                     # the driver's actual
        assert g.changes == [2048] and g.dev.info()["actual_mib"] == 8
        # Deflate: the pages are the guest's again, as they are.
        g.post(1, [(g.buffer(struct.pack("<I", pfns[0])), 4, False)])
        g.wait_used(1, 1)
        # A new target is a configuration change the driver is told of.
        g.dev.set_target(4 * 256)
        assert g.interrupt.read() & VIRTIO_MMIO_INT_CONFIG
        assert struct.unpack_from("<I", g.dev.config)[0] == 1024
        # Malformed: page numbers outside RAM, a length not a multiple of 4, a device-writable
        # buffer: skipped, the device serves on.
        g.post(0, [(g.buffer(struct.pack("<I", (RAM * 4) >> PAGE_SHIFT)), 4, False)])
        g.post(0, [(g.buffer(b"\1\2\3"), 3, False)])
        g.post(0, [(g.buffer(bytes(8)), 8, True)])
        g.wait_used(0, 11)
        assert not g.dev.broken
    finally:
        g.close()


def test_reported_free_pages_go_back_to_the_host(io: EventLoop) -> None:
    g = Guest(BalloonConfig(free_page_reporting=True), io)
    try:
        assert len(g.dev.queue_sizes) == 3 and g.dev.reporting_queue == 2
        g.mem.write(16 * MiB, b"\x55" * (4 * MiB))
        g.post(2, [(16 * MiB, 2 * MiB, True), (18 * MiB, 2 * MiB, True)])   # Linux: 2 MiB blocks
        g.wait_used(2, 1)
        assert g.resident(16 * MiB, 4 * MiB) == 0
    finally:
        g.close()


def test_free_page_hinting_runs(io: EventLoop) -> None:
    """Hinting (5.5.6.6): a run's id in free_page_hint_cmd_id, told with a configuration change;
    the pages the guest hints under it go back to the host, those under another id do not; the
    guest's STOP ends the run (DONE), or, with acknowledge_on_stop off, the host's stop does."""
    g = Guest(BalloonConfig(stats_polling_interval_s=1, free_page_hinting=True, free_page_reporting=True), io)
    try:
        assert (g.dev.hinting_queue, g.dev.reporting_queue, len(g.dev.queue_sizes)) == (3, 4, 5)
        assert g.dev.hinting_status() == {"host_cmd": 0, "guest_cmd": None}
        g.mem.write(16 * MiB, b"\x55" * (8 * MiB))
        g.dev.start_hinting()
        assert g.interrupt.read() & VIRTIO_MMIO_INT_CONFIG
        assert struct.unpack_from("<I", g.dev.config, 8)[0] == 2
        stale, run = g.buffer(struct.pack("<I", 7)), g.buffer(struct.pack("<I", 2))
        g.post(3, [(stale, 4, False), (16 * MiB, 4 * MiB, True)])      # another run's: kept
        g.post(3, [(run, 4, False), (20 * MiB, 4 * MiB, True)])        # this run's: given back
        g.wait_used(3, 2)
        assert (g.resident(16 * MiB, 4 * MiB), g.resident(20 * MiB, 4 * MiB)) == (1024, 0)
        assert g.dev.hinting_status() == {"host_cmd": 2, "guest_cmd": 2}
        g.post(3, [(g.buffer(struct.pack("<I", 0)), 4, False)])         # the guest's STOP
        deadline = time.monotonic() + 5                                   # DONE: pages back to it
        while g.dev.hinting_status() != {"host_cmd": 1, "guest_cmd": 0}:
            assert time.monotonic() < deadline, g.dev.hinting_status()
            time.sleep(0.005)
        g.dev.start_hinting(acknowledge_on_stop=False)
        g.post(3, [(g.buffer(struct.pack("<I", 0)), 4, False)])
        g.wait_used(3, 4)
        assert g.dev.hinting_status() == {"host_cmd": 3, "guest_cmd": 0}   # waits for the host
        g.dev.stop_hinting()
        assert g.dev.hinting_status()["host_cmd"] == 1
        g.post(3, [(RAM * 4, 4, False)])                                  # a command id outside RAM
        deadline = time.monotonic() + 5
        while not g.dev.broken:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        g.close()


def test_statistics_are_taken_and_handed_back(io: EventLoop) -> None:
    g = Guest(BalloonConfig(stats_polling_interval_s=1), io)
    try:
        assert g.dev.stats_queue == 2
        figures = ((4, 300 * MiB), (5, 512 * MiB), (99, 1))         # free, total, a tag not known
        stats = b"".join(struct.pack("<HQ", tag, value) for tag, value in figures)
        g.post(2, [(g.buffer(stats), len(stats), False)])
        deadline = time.monotonic() + 5
        while "total_memory" not in g.dev.info():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert g.dev.info() == {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0,
                                "free_memory": 300 * MiB, "total_memory": 512 * MiB}
        assert g.drivers[2].used_idx() == 0              # held until the interval ends
        g.wait_used(2, 1, timeout=3)                     # then handed back to be filled again
        with pytest.raises(Exception, match="cannot be enabled/disabled"):
            g.dev.set_stats_interval(0)
    finally:
        g.close()


@needs_kvm
def test_firecrackers_balloon_api(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    fc = Firecracker(vms, tmp_path / "api.sock")
    fc.ok("PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 0})
    settings = {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 0,
                "free_page_hinting": False, "free_page_reporting": False}
    assert fc.ok("GET", "/balloon") == settings
    assert "not supported before starting" in fc.fault("PATCH", "/balloon", {"amount_mib": 8})
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": "console=ttyS0 probe.run=snapshot"})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: snap ready")
    fc.ok("PATCH", "/balloon", {"amount_mib": 32})
    assert fc.ok("GET", "/balloon") == {**settings, "amount_mib": 32}
    assert fc.ok("GET", "/vm/config")["balloon"] == {**settings, "amount_mib": 32}    # type: ignore[index]
    assert "stats are disabled" in fc.fault("GET", "/balloon/statistics")
    assert "cannot be enabled/disabled" in fc.fault("PATCH", "/balloon/statistics",
                                                    {"stats_polling_interval_s": 5})
    assert "invalid value: integer `-1`, expected u16" in fc.fault("PATCH", "/balloon/statistics",
                                                                   {"stats_polling_interval_s": -1})
    assert "not supported after starting" in fc.fault("PUT", "/balloon",
                                                      {"amount_mib": 1, "deflate_on_oom": False})
    assert fc.fault("PATCH", "/balloon/hinting/start") == \
        "Balloon update error: Attempting to use hinting when not enabled"
    assert "hinting when not enabled" in fc.fault("GET", "/balloon/hinting/status")
    fc.vm.type("quit")
    assert fc.vm.finish()[0] == 0


@needs_kvm
def test_qmp_balloon(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """StratoVirt's -device virtio-balloon-device, set with QMP's balloon, read with query-balloon
    (the probe has no balloon driver: the guest keeps all its memory)."""
    sock = tmp_path / "qmp.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-m", "256M", "-append", "probe.run=wait",
            "-serial", "stdio", "-device", "virtio-balloon-device,deflate-on-oom=on",
            "-api-channel", f"unix:{sock}")
    vms.append(vm)
    vm.wait_line("probe: waiting")
    mon = QEMUMonitorProtocol(str(sock))
    mon.connect()
    assert mon.cmd_obj({"execute": "query-balloon"}) == {"return": {"actual": 256 * MiB}}
    assert mon.cmd_obj({"execute": "balloon", "arguments": {"value": 128 * MiB}}) == {"return": {}}
    assert mon.cmd_obj({"execute": "balloon", "arguments": {"value": 0}})["error"]["desc"] == \
        "Parameter 'target' expects a size"
    assert mon.cmd_obj({"execute": "quit"}) == {"return": {}}
    with contextlib.suppress(EOFError):     # qemu.qmp reports the close that quit asked for
        mon.close()
    assert vm.finish()[0] == 0
