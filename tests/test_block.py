"""virtio-blk: the probe's block test on real image files, QEMU agreement, image locking,
and the virtio-abuse test."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.backends import blockfile
from altovirt.backends.blockfile import BlockFile
from altovirt.backends.uring import Ring, unavailable
from altovirt.config.model import RateLimiterConfig
from altovirt.devices.virtio import block as vblk
from altovirt.devices.virtio.device import Interrupt
from altovirt.devices.virtio.queue import Queue
from altovirt.eventloop import EventLoop
from altovirt.memory import GuestMemory

from .cabi import c_values, needs_gcc
from .conftest import ROOT, Vm, altovirt_cmd, needs_kvm, needs_qemu, qemu_cmd, run_altovirt, run_qemu
from .livecopy import LiveCopy
from .virtq import DriverQueue

ABUSE_CASES = ["index", "loop", "address", "length", "indirect-nested", "indirect-length",
               "indirect-next", "write-to-readonly", "no-status", "avail-idx"]
# QEMU completes these two instead of flagging them; AltoVirt follows the spec strictly.
QEMU_LENIENT = {"address", "write-to-readonly"}


def pattern(disk: int) -> bytes:
    return bytes((j * 7 + 3 + disk) & 0xFF for j in range(4096))


@pytest.fixture
def images(tmp_path: Path) -> Iterator[list[tuple[Path, bytes]]]:
    """Three images with random content: 1 MiB, 2 MiB, 3 MiB."""
    out = []
    for i in range(3):
        data = os.urandom((i + 1) << 20)
        path = tmp_path / f"disk{i}.img"
        path.write_bytes(data)
        out.append((path, data))
    yield out


def blk_line(report_line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in report_line.split()[1:])


def check_disk(line: dict[str, str], path: Path, original: bytes, disk: int, ro: bool) -> None:
    assert int(line["capacity"]) == len(original) // 512
    assert int(line["read-crc32"], 16) == zlib.crc32(original[:4096])
    assert line["ro"] == str(int(ro)) and line["oob"] == "ioerr" and line["unknown"] == "unsupp"
    now = path.read_bytes()
    if ro:
        assert line["write"] == "ioerr" and now == original
    else:
        assert (line["write"], line["flush"], line["zeroes"], line["discard"]) == ("ok",) * 4
        assert now[4096:8192] == pattern(disk)                     # sector 8: the probe's data
        assert now[8192:16384] == bytes(8192)                      # sectors 16-31: zeroed, discarded
        assert now[:4096] == original[:4096] and now[16384:] == original[16384:]


@needs_gcc
def test_config_layout_and_constants() -> None:
    h = ("linux/virtio_blk.h",)
    offsets = {"capacity": 0, "seg_max": 12, "blk_size": 20, "num_queues": 34, "max_discard_sectors": 36,
               "max_discard_seg": 40, "discard_sector_alignment": 44, "max_write_zeroes_sectors": 48,
               "max_write_zeroes_seg": 52, "write_zeroes_may_unmap": 56}
    got = c_values(h, tuple(f"offsetof(struct virtio_blk_config, {f})" for f in offsets))
    assert list(got.values()) == list(offsets.values())
    assert vblk._CONFIG.size == c_values(h, ("offsetof(struct virtio_blk_config, unused1) + 3",))[
        "offsetof(struct virtio_blk_config, unused1) + 3"]
    names = {n: getattr(vblk, n) for n in dir(vblk) if n.startswith(("VIRTIO_BLK_F_", "VIRTIO_BLK_T_",
                                                                     "VIRTIO_BLK_S_"))}
    names["VIRTIO_BLK_ID_BYTES"] = vblk.VIRTIO_BLK_ID_BYTES
    names["VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP"] = vblk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    assert c_values(h, tuple(names)) == names


@needs_kvm
@pytest.mark.parametrize("direct", ["on", "off"])
@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_blk_read_write_flush(probe: Path, images: list[tuple[Path, bytes]], direct: str, aio: str) -> None:
    (p0, d0), (p1, d1), _ = images
    run = run_altovirt("-kernel", str(probe / "probe.elf"),
                       "-drive", f"id=d0,file={p0},serial=SERIAL-0,direct={direct},aio={aio}",
                       "-drive", f"id=d1,file={p1},readonly=on,direct={direct},aio={aio}",
                       "-append", "probe.run=blk", "-serial", "stdio")
    assert run.returncode == 0, run.stderr
    assert run.report.tests == {"blk": "ok"} and run.report.line("blk disks") == "blk disks=2"
    l0, l1 = blk_line(run.report.line("blk0 ")), blk_line(run.report.line("blk1 "))
    assert (l0["serial"], l1["serial"], l0["seg_max"], l0["blk_size"]) == ("SERIAL-0", "-", "254", "512")
    check_disk(l0, p0, d0, 0, ro=False)
    check_disk(l1, p1, d1, 1, ro=True)


@needs_kvm
def test_six_disks(probe: Path, tmp_path: Path) -> None:
    args = []
    for i in range(6):
        (tmp_path / f"{i}.img").write_bytes(bytes([i]) * (1 << 20))
        args += ["-drive", f"id=disk{i},file={tmp_path / f'{i}.img'}"]
    run = run_altovirt("-kernel", str(probe / "probe.elf"), *args, "-append", "probe.run=blk",
                       "-serial", "stdio")
    assert run.returncode == 0 and run.report.line("blk disks") == "blk disks=6"
    for i in range(6):
        assert (tmp_path / f"{i}.img").read_bytes()[4096:8192] == pattern(i)   # vda..vdf in order


@needs_qemu
def test_blk_agrees_with_qemu(probe: Path, images: list[tuple[Path, bytes]], tmp_path: Path) -> None:
    (p0, d0), (p1, d1), _ = images
    q0, q1 = tmp_path / "q0.img", tmp_path / "q1.img"
    q0.write_bytes(d0)
    q1.write_bytes(d1)
    qemu = run_qemu(probe / "probe.elf", "probe.run=blk", devices=(
        "virtio-blk-device,drive=d0,serial=SERIAL-0", "virtio-blk-device,drive=d1"),
        # discard=unmap: QEMU ignores discards by default; AltoVirt always passes them on
        extra=("-drive", f"file={q0},if=none,id=d0,format=raw,discard=unmap",
               "-drive", f"file={q1},if=none,id=d1,format=raw,readonly=on"))
    alto = run_altovirt("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0},serial=SERIAL-0",
                        "-drive", f"id=d1,file={p1},readonly=on", "-append", "probe.run=blk",
                        "-serial", "stdio")
    assert qemu.report.tests == alto.report.tests == {"blk": "ok"}
    for disk in ("blk0 ", "blk1 "):
        q, a = blk_line(qemu.report.line(disk)), blk_line(alto.report.line(disk))
        if disk == "blk1 ":      # QEMU offers discard and write-zeroes even on read-only disks
            for k in ("zeroes", "discard"):
                q.pop(k), a.pop(k)
        assert q == a
    assert q0.read_bytes() == p0.read_bytes() and q1.read_bytes() == p1.read_bytes()


@needs_qemu
def test_image_locking_against_qemu(probe: Path, images: list[tuple[Path, bytes]]) -> None:
    (p0, _), _, _ = images
    cmd = qemu_cmd(probe / "probe.elf", "probe.run=wait", devices=("virtio-blk-device,drive=d0",))
    cmd += ["-drive", f"file={p0},if=none,id=d0,format=raw"]
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert qemu.stdout is not None
        while b"probe: waiting" not in qemu.stdout.readline():
            pass
        for ro in ("off", "on"):
            run = run_altovirt("-kernel", str(probe / "probe.elf"),
                               "-drive", f"id=d0,file={p0},readonly={ro}")
            assert run.returncode == 2
            assert run.stderr == (f"altovirt: error: -drive id=d0: {p0}: image is in use by another process "
                                  "(QEMU or AltoVirt), which holds or forbids the write permission\n")
    finally:
        qemu.kill()
        qemu.wait()


@needs_qemu
def test_qemu_refuses_an_image_altovirt_writes(probe: Path, images: list[tuple[Path, bytes]],
                                                vms: list[Vm]) -> None:
    (p0, _), _, _ = images
    vm = Vm("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0}", "-append", "probe.run=wait",
            "-serial", "stdio")
    vms.append(vm)
    vm.wait_line("probe: waiting")
    qemu = run_qemu(probe / "probe.elf", "probe.run=info", devices=("virtio-blk-device,drive=d0",),
                    extra=("-drive", f"file={p0},if=none,id=d0,format=raw"))
    assert qemu.returncode == 1 and 'Failed to get "write" lock' in qemu.stderr


@needs_kvm
def test_read_only_images_can_be_shared(probe: Path, images: list[tuple[Path, bytes]], vms: list[Vm]) -> None:
    (p0, _), _, _ = images
    vm = Vm("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0},readonly=on",
            "-append", "probe.run=wait", "-serial", "stdio")
    vms.append(vm)
    vm.wait_line("probe: waiting")
    assert run_altovirt("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0},readonly=on",
                        "-append", "probe.run=blk", "-serial", "stdio").returncode == 0
    p = subprocess.run(altovirt_cmd("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0}"),
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 2 and "image is in use" in p.stderr


@needs_kvm
def test_virtio_abuse(probe: Path, images: list[tuple[Path, bytes]], tmp_path: Path) -> None:
    (p0, _), _, _ = images
    log = tmp_path / "vm.log"
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={p0}",
                       "-device", "virtio-rng", "-append", "probe.run=virtio-abuse,rng,blk",
                       "-serial", "stdio", "-D", str(log))
    assert run.returncode == 0, run.stderr
    for case in ABUSE_CASES:
        assert run.report.line(f"abuse {case} ") == f"abuse {case} needs-reset=1 isr=0x2"
    assert run.report.line("abuse blk-after") == "abuse blk-after-reset=ok"
    assert run.report.tests == {"virtio-abuse": "ok", "rng": "ok", "blk": "ok"}
    errors = [ln for ln in log.read_text().splitlines() if " ERROR " in ln]
    assert len(errors) == len(ABUSE_CASES) and all("the device needs a reset" in e for e in errors)
    assert any("loops or exceeds" in e for e in errors)


@needs_qemu
def test_virtio_abuse_agrees_with_qemu(probe: Path, images: list[tuple[Path, bytes]]) -> None:
    (p0, _), _, _ = images
    qemu = run_qemu(probe / "probe.elf", "probe.run=virtio-abuse,rng",
                    devices=("virtio-blk-device,drive=d0", "virtio-rng-device"),
                    extra=("-drive", f"file={p0},if=none,id=d0,format=raw"))
    for case in ABUSE_CASES:
        if case not in QEMU_LENIENT:
            assert f"abuse {case} needs-reset=1 " in qemu.report.line(f"abuse {case} ") + " "
    assert qemu.report.line("abuse blk-after") == "abuse blk-after-reset=ok"
    assert qemu.report.tests["rng"] == "ok"


class Harness:
    """A Block device on a real image, driven in-process through a DriverQueue."""

    def __init__(self, img: Path, rate_limiter: RateLimiterConfig | None = None,
                 io: EventLoop | None = None, ring: Ring | None = None, direct: bool = False) -> None:
        """``io``: the loop the device's rate limiter times itself on, and ``ring`` (io_engine
        Async) reaps its completions on."""
        self.mem = GuestMemory(layout.ram_regions(128 << 20))
        self.pool = vblk.WorkerPool()
        self.pool.start()
        self.dev = vblk.Block("d0", BlockFile(str(img), read_only=False, direct=direct), self.pool,
                              rate_limiter=rate_limiter, ring=ring)
        self.irqfd = os.eventfd(0, os.EFD_NONBLOCK)
        self.resets: list[str] = []
        self.drv = DriverQueue(self.mem, 0x100000, 64)
        q = Queue(256, self.mem)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = 64, self.drv.desc, self.drv.avail, self.drv.used
        q.activate(0)
        self.dev.activate(self.mem, [q], Interrupt(self.irqfd, self.resets.append), io)  # type: ignore[arg-type]
        self.slot = 0

    def post_read(self, sector: int, length: int, skew: int = 0) -> tuple[int, int]:
        """Queue a read (not yet notified), its buffer ``skew`` bytes past a page; returns
        (data address, status address)."""
        return self.post(vblk.VIRTIO_BLK_T_IN, sector, length, skew)

    def post(self, kind: int, sector: int, length: int, skew: int = 0) -> tuple[int, int]:
        """Queue a request of ``kind`` (its data, for a write, to be put at the data address)."""
        base = 0x200000 + self.slot * 0x10000
        self.slot += 1
        self.mem.write(base, vblk._HEADER.pack(kind, 0, sector))
        data = base + 0x1000 + skew
        writable = kind != vblk.VIRTIO_BLK_T_OUT
        parts = [(base, 16, False), (data, length, writable)] if length else [(base, 16, False)]
        self.drv.publish(self.drv.chain([*parts, (data + length, 1, True)]))
        return data, data + length

    def run(self, expect_used: int) -> None:
        self.dev.queue_notify(0)
        deadline = time.monotonic() + 10
        while self.drv.used_idx() < expect_used:         # workers complete them
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def close(self) -> None:
        self.dev.close()
        self.pool.stop()
        os.close(self.irqfd)
        self.mem.close()


def test_contiguous_requests_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    h = Harness(img)
    preadv_calls = counted_preadv(monkeypatch)
    try:
        reads = [h.post_read(8 * i, 4096) for i in (2, 0, 1)]     # posted out of order, contiguous
        h.run(3)
        assert preadv_calls == [3]                                  # one vectored read for all three
        for (buf, status), i in zip(reads, (2, 0, 1), strict=True):
            assert h.mem.read(status, 1) == b"\0" and h.mem.read(buf, 4096) == data[4096 * i:4096 * (i + 1)]
        # A run whose last request is past the end: each request gets its own status.
        preadv_calls.clear()
        tail = [h.post_read(2040, 4096), h.post_read(2048, 4096)]
        h.run(5)
        assert [h.mem.read(s, 1)[0] for _, s in tail] == [vblk.VIRTIO_BLK_S_OK, vblk.VIRTIO_BLK_S_IOERR]
        assert h.mem.read(tail[0][0], 4096) == data[-4096:]
        assert not h.resets
    finally:
        h.close()


@needs_kvm
def test_a_read_that_completes_during_a_live_migration_reaches_the_destination(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read a worker holds across a pass of a live migration, its data landing after the pass
    went: the pages are noted as written when the request completes, so a later pass sends them
    (a note taken when the request was handed out is spent on the pass that went before)."""
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    h = Harness(img)
    copy = LiveCopy(h.mem)
    reading, go_on = threading.Event(), threading.Event()
    real = blockfile._preadv

    def held_preadv(fd: int, iov: int, count: int, offset: int) -> int:
        reading.set()
        assert go_on.wait(10)
        return int(real(fd, iov, count, offset))

    monkeypatch.setattr(blockfile, "_preadv", held_preadv)
    try:
        copy.first_pass()
        buf, status = h.post_read(8, 8192)
        h.dev.queue_notify(0)
        assert reading.wait(10)         # a worker has the request; nothing is read yet
        copy.next_pass()
        go_on.set()
        deadline = time.monotonic() + 10
        while h.drv.used_idx() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        dest = copy.finish()
        assert h.mem.read(status, 1) == b"\0" and h.mem.read(buf, 8192) == data[4096:12288]
        assert dest[buf:buf + 8192] == data[4096:12288]
        assert dest[status] == vblk.VIRTIO_BLK_S_OK
    finally:
        go_on.set()
        copy.close()
        h.close()


def test_quiesce_says_when_requests_stay_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that does not complete: quiesce (a pause) and prepare_save (a snapshot) give up
    with an error that names the device, instead of going on with it in flight."""
    from altovirt.devices.virtio.device import DeviceBusyError
    from altovirt.persist import SaveError
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    h = Harness(img)
    monkeypatch.setattr(vblk, "QUIESCE_TIMEOUT", 0.2)
    go_on = threading.Event()
    real = blockfile._preadv
    monkeypatch.setattr(blockfile, "_preadv", lambda *args: go_on.wait(10) and real(*args))
    try:
        h.post_read(0, 4096)
        h.dev.queue_notify(0)
        with pytest.raises(DeviceBusyError, match=r"^d0: 1 requests still in flight after 0.2 s"):
            h.dev.quiesce()
        with pytest.raises(SaveError, match=r"^d0: 1 requests still in flight"):
            h.dev.prepare_save()
        go_on.set()
        h.dev.quiesce()
        assert h.drv.used_idx() == 1
    finally:
        go_on.set()
        h.close()


SHM = Path("/dev/shm")


@pytest.mark.skipif(not (SHM.is_dir() and os.access(SHM, os.W_OK)),
                    reason="SKIPPED LOUDLY: no writable /dev/shm (tmpfs) for an image in memory")
def test_an_image_in_memory_is_served_within_the_notification(tmp_path: Path) -> None:
    """An image on tmpfs: a read, a write and a flush are done on the I/O thread as it takes
    the notification (a copy, sooner done than a worker woken); an image on a disk's file
    system goes to the workers."""
    img = SHM / f"altovirt-test-{os.getpid()}.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    h = Harness(img)
    try:
        assert h.dev.image is not None and h.dev.image.in_memory
        h.pool.stop()                   # nothing left to do the work but the notification
        buf, status = h.post_read(8, 4096)
        h.post(vblk.VIRTIO_BLK_T_OUT, 0, 512)
        h.post(vblk.VIRTIO_BLK_T_FLUSH, 0, 0)
        h.dev.queue_notify(0)
        assert h.drv.used_idx() == 3 and h.mem.read(status, 1) == b"\0"
        assert h.mem.read(buf, 4096) == data[4096:8192]
    finally:
        h.close()
        img.unlink()
    (tmp_path / "disk.img").write_bytes(data)
    on_disk = BlockFile(str(tmp_path / "disk.img"), read_only=True, direct=False)
    try:
        assert not on_disk.in_memory
    finally:
        on_disk.close()


def counted_preadv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The buffer count of each preadv the disk backend makes from now on."""
    calls: list[int] = []
    real = blockfile._preadv

    def preadv(fd: int, iov: int, count: int, offset: int) -> int:
        calls.append(count)
        return int(real(fd, iov, count, offset))
    monkeypatch.setattr(blockfile, "_preadv", preadv)
    return calls


def test_direct_io_with_buffers_of_any_alignment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With O_DIRECT, block-aligned guest buffers go straight to the file in one call; buffers
    a driver placed anywhere else still read and write the right bytes (bounced)."""
    img = tmp_path / "direct.img"
    data = os.urandom(64 << 10)
    img.write_bytes(data)
    f = BlockFile(str(img), read_only=False, direct=True)
    mem = GuestMemory(layout.ram_regions(1 << 20))
    try:
        if not f.direct:
            pytest.skip(f"SKIPPED: the file system under {tmp_path} refuses O_DIRECT")
        calls = counted_preadv(monkeypatch)
        f.read(0, mem.iovec([4096, 16384], [4096, 4096]))
        assert calls == [2] and mem.read(4096, 4096) + mem.read(16384, 4096) == data[:8192]
        odd = mem.iovec([100, 5000], [512, 7680])
        f.read(4096, odd)
        assert odd.tobytes() == data[4096:12288] and calls == [2, 2, 1]    # refused, then bounced
        new = os.urandom(8192)
        odd.fill(new)
        f.write(8192, odd)
        assert img.read_bytes() == data[:8192] + new + data[16384:]
    finally:
        f.close()
        mem.close()


def test_header_data_and_status_split_anywhere(tmp_path: Path) -> None:
    """virtio 1.2, 2.6.4: no framing is assumed. A write whose header and first data share a
    buffer, and a read whose data and status byte share one, do what they say."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    h = Harness(img)
    try:
        data = os.urandom(1024)
        base = 0x200000
        h.mem.write(base, vblk._HEADER.pack(vblk.VIRTIO_BLK_T_OUT, 0, 2) + data[:100])
        h.mem.write(base + 0x1000, data[100:])
        h.drv.publish(h.drv.chain([(base, 16 + 100, False), (base + 0x1000, 924, False),
                                   (base + 0x2000, 1, True)]))
        h.run(1)
        assert h.mem.read(base + 0x2000, 1)[0] == vblk.VIRTIO_BLK_S_OK
        assert img.read_bytes()[1024:2048] == data
        h.mem.write(base + 0x3000, vblk._HEADER.pack(vblk.VIRTIO_BLK_T_IN, 0, 2))
        h.drv.publish(h.drv.chain([(base + 0x3000, 16, False), (base + 0x4000, 1025, True)]))
        h.run(2)
        assert h.mem.read(base + 0x4000, 1025) == data + bytes([vblk.VIRTIO_BLK_S_OK])
        assert h.drv.used_elem(1)[1] == 1025 and not h.resets
    finally:
        h.close()


def test_io_error_becomes_ioerr(tmp_path: Path) -> None:
    """A disk that shrinks under the VM: reads past the new end complete with IOERR."""
    img = tmp_path / "shrinks.img"
    img.write_bytes(os.urandom(1 << 20))
    h = Harness(img)
    try:
        os.truncate(img, 4096)
        _, ok = h.post_read(0, 4096)
        h.run(1)
        _, bad = h.post_read(1024, 4096)
        h.run(2)
        assert h.mem.read(ok, 1)[0] == vblk.VIRTIO_BLK_S_OK
        assert h.mem.read(bad, 1)[0] == vblk.VIRTIO_BLK_S_IOERR
        assert not h.resets and os.eventfd_read(h.irqfd) >= 1
    finally:
        h.close()


needs_uring = pytest.mark.skipif(unavailable() is not None,
                                 reason=f"SKIPPED LOUDLY: no io_uring on this host: {unavailable()}")


@needs_uring
def test_async_engine_reads_writes_and_flushes_through_its_ring(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """io_engine Async: reads (merged), writes and flushes go through the disk's io_uring from
    the I/O thread, no worker touching them; what the kernel fails (a read past a shrunken
    end, O_DIRECT on buffers it refuses) the workers do again and report. A pause of the I/O
    thread does not strand a completion: quiesce takes it."""
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    io = EventLoop("io")
    io.start()
    h = Harness(img, io=io, ring=Ring(vblk.QUEUE_SIZE), direct=True)
    worker_reads = counted_preadv(monkeypatch)
    try:
        reads = [h.post_read(8 * i, 4096) for i in (2, 0, 1)]
        h.run(3)
        assert [h.mem.read(st, 1)[0] for _, st in reads] == [vblk.VIRTIO_BLK_S_OK] * 3
        assert [h.mem.read(buf, 4096) for buf, _ in reads] == [data[4096 * i:4096 * (i + 1)]
                                                               for i in (2, 0, 1)]
        new = os.urandom(8192)
        buf, status = h.post(vblk.VIRTIO_BLK_T_OUT, 16, 8192)
        h.mem.write(buf, new)
        _, flushed = h.post(vblk.VIRTIO_BLK_T_FLUSH, 0, 0)
        h.run(5)
        assert h.mem.read(status, 1)[0] == h.mem.read(flushed, 1)[0] == vblk.VIRTIO_BLK_S_OK
        assert img.read_bytes()[8192:16384] == new
        assert worker_reads == []                       # the ring did all of that
        if h.dev.image is not None and h.dev.image.direct:
            odd, odd_status = h.post_read(32, 4096, skew=100)   # O_DIRECT refuses it: bounced by a worker
            h.run(6)
            assert h.mem.read(odd_status, 1)[0] == vblk.VIRTIO_BLK_S_OK
            assert h.mem.read(odd, 4096) == data[16384:20480] and worker_reads == [1, 1]
        os.truncate(img, 4096)
        _, bad = h.post_read(1024, 4096)
        h.run(h.drv.used_idx() + 1)
        assert h.mem.read(bad, 1)[0] == vblk.VIRTIO_BLK_S_IOERR and not h.resets
        io.pause()
        late, late_status = h.post_read(0, 4096)
        h.dev.queue_notify(0)                           # submitted with the I/O thread parked
        h.dev.quiesce()
        assert h.mem.read(late_status, 1)[0] == vblk.VIRTIO_BLK_S_OK and h.mem.read(late, 4096) == data[:4096]
        io.resume()
    finally:
        h.close()
        io.stop()


@needs_uring
def test_a_ring_the_kernel_refuses_breaks_the_device_not_the_vmm(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A submission the kernel refuses for good (not EINTR or EAGAIN): the device needs a reset,
    and its requests end at once rather than keeping a pause or a reset waiting."""
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    io = EventLoop("io")
    io.start()
    ring = Ring(vblk.QUEUE_SIZE)
    h = Harness(img, io=io, ring=ring)
    try:
        def refused() -> int:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        monkeypatch.setattr(ring, "submit", refused)
        h.post_read(0, 4096)
        h.dev.queue_notify(0)
        assert h.dev.broken and h.resets
        began = time.monotonic()
        h.dev.quiesce()
        assert time.monotonic() - began < 1
    finally:
        h.close()
        io.stop()


@needs_kvm
def test_blkbench_runs(probe: Path, tmp_path: Path) -> None:
    """The benchmark's guest side works (bench/block.py reports the figures)."""
    img = tmp_path / "bench.img"
    img.write_bytes(os.urandom(64 << 20))
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={img}",
                       "-append", "probe.run=blkbench", "-serial", "stdio", timeout=120)
    assert run.returncode == 0 and run.report.tests == {"blkbench": "ok"}
    words = dict(w.split("=") for w in run.report.line("blkbench ").split()[1:])
    assert set(words) == {"tsc_khz", "seq-write-MBps", "seq-read-MBps", "rand4k-qd1-iops", "rand4k-qd32-iops"}
    assert all(int(v) > 0 for v in words.values())
