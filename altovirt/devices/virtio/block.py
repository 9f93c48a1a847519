"""virtio-blk (VIRTIO 1.2, section 5.2) on a raw image.

A request is a header (type, reserved, sector), data, and a status byte
the device writes last. The header and data may be split across any number
of descriptors; data moves between the image and guest RAM with no copies.
I/O errors become VIRTIO_BLK_S_IOERR, unknown types VIRTIO_BLK_S_UNSUPP; a
request whose shape breaks the rules (no status byte, data to write into a
device-readable buffer) puts the device in DEVICE_NEEDS_RESET.

The I/O thread validates requests and a pool of workers, shared by every
disk of the VM, carries them out; they complete in any order, as virtio
allows. A disk with io_engine "Async" has its own io_uring instead, which
the I/O thread feeds reads, writes and flushes and reaps on its eventfd: no
thread hand-off per request (the workers keep the rest, and redo what the
kernel fails, to report it).
"""

from __future__ import annotations

import itertools
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...backends.blockfile import SECTOR_SIZE, BlockFile
from ...config.model import RateLimiterConfig
from ...errors import AltoVirtError
from ...eventloop import EventLoop
from ...memory import GuestMemory, IoVec
from ..rate_limiter import RateLimiter
from .device import COMMON_FEATURES, VIRTIO_ID_BLOCK, DeviceBusyError, Interrupt, VirtioDevice
from .queue import DescriptorChain, Queue, QueueError

if TYPE_CHECKING:
    from ...backends.uring import Ring

log = logging.getLogger(__name__)

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
# Request types and status (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

QUEUE_SIZE = 256
# Requests carried out at once, like QEMU's aio=threads pool: the GIL is released
# during preadv/pwritev, so several requests keep the host disk busy.
WORKERS = 8
IOV_MAX = 1024                      # sysconf(_SC_IOV_MAX) on Linux
MAX_MERGE_BYTES = 32 << 20
SEG_MAX = QUEUE_SIZE - 2            # the header and status take one descriptor each
MAX_DISCARD_SECTORS = (1 << 32) - 1
QUIESCE_TIMEOUT = 30.0              # s a pause waits for requests in flight before it gives up
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")     # sector, num_sectors, flags
# struct virtio_blk_config, up to write_zeroes_may_unmap (5.2.4)
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
Buffers = tuple[list[int], list[int]]   # guest addresses, lengths


@dataclass
class Request:
    """A validated request: where its data is and where its status byte goes."""

    chain: DescriptorChain          # given back, once done, to the used ring
    kind: int
    sector: int
    data_out: IoVec                 # device-readable data, after the header
    data_in: IoVec                  # device-writable data, before the status byte
    status: memoryview


class RequestError(AltoVirtError):
    """A request the device completes with a status other than OK."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class WorkerPool:
    """The threads that carry out every disk's requests (QEMU's thread pool). They start
    with the VM, so no thread is created once the VMM is confined (see sandbox); ``on_start``
    runs first on each (where the VMM confines it)."""

    def __init__(self, size: int = WORKERS, on_start: Callable[[], None] | None = None) -> None:
        self._on_start = on_start
        self._jobs: queue.SimpleQueue[tuple[Callable[[list[Request]], None], list[Request]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"blk{i}", daemon=True) for i in range(size)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[list[Request]], None], run: list[Request]) -> None:
        self._jobs.put((job, run))

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while (item := self._jobs.get()) is not None:
            job, run = item
            job(run)

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(5)


class Block(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, image: BlockFile | None, pool: WorkerPool,
                 serial: bytes = b"", rate_limiter: RateLimiterConfig | None = None,
                 ring: Ring | None = None) -> None:
        """``image`` None is an empty hot-plug slot: a disk of no sectors, every I/O an IOERR.
        ``serial``: what VIRTIO_BLK_T_GET_ID answers, cut to its 20 bytes. ``rate_limiter``:
        each request takes an operation and its data's bytes (Firecracker's rule). ``ring``
        (io_engine Async): reads, writes and flushes go through this io_uring, the device's
        own, from the I/O thread; the rest, and any the kernel fails, to the workers."""
        super().__init__(name)
        self._ring = ring
        self._ring_lock = threading.Lock()
        self._ring_runs: dict[int, tuple[list[Request], IoVec | None]] = {}
        self._ring_tags = itertools.count()
        self._ring_watched = False
        self._ring_broken = False       # the kernel refused a submission: the workers take all
        self.image = image
        self.serial = serial[:VIRTIO_BLK_ID_BYTES]
        self.rate_limiter = RateLimiter(rate_limiter, self._unthrottled)
        self._pool = pool
        self._used_lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = 0
        self.capacity = image.size // SECTOR_SIZE if image else 0
        self.config = bytearray(_CONFIG.pack(
            self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE,    # capacity .. geometry, blk_size
            0, 0, 0, 0,                                        # topology
            0, 0, 1,                                           # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, 1, 1,                         # discard: sectors, segments, alignment
            MAX_DISCARD_SECTORS, 1, 1))                        # write zeroes: sectors, segments, may unmap

    def device_features(self) -> int:
        features = COMMON_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE \
            | 1 << VIRTIO_BLK_F_FLUSH
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    @property
    def read_only(self) -> bool:
        return self.image is not None and self.image.read_only

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        self.rate_limiter.attach(io)
        if self._ring is not None and not self._ring_watched:
            io.add(self._ring.eventfd, self._ring_done)
            self._ring_watched = True

    def queue_notify(self, index: int) -> None:
        """Validate what the driver posted (I/O thread); hand the I/O to the workers,
        so that this thread is free to take the driver's next notification at once, but
        for an image in memory (tmpfs), whose I/O is a copy done sooner here than a worker
        would wake to it. A request the rate limiter holds back goes back to the ring, for
        its timer."""
        requests = []
        assert self.active is not None
        mem, queue, limiter = self.active.mem, self.active.queues[0], self.rate_limiter
        counters = self.counters
        counters["queue_event_count"] += 1
        try:
            for chain in self.chains(queue):
                request = _parse(chain, mem)
                size = _data_bytes(request)
                if limiter.active and not limiter.consume(size):
                    queue.undo_pop()
                    counters["rate_limiter_throttled_events"] += 1
                    break
                requests.append(request)
                keys = _COUNTED.get(request.kind)
                if keys is not None:
                    counters[keys[0]] += 1
                    if keys[1]:
                        counters[keys[1]] += size
        except QueueError as e:
            self.fail(str(e))
        if not requests:
            return
        with self._idle:
            self._in_flight += len(requests)
        runs = _merge(requests)
        if self._ring is not None:
            runs = self._to_ring(runs)
        image = self.image
        for run in runs:
            if image is not None and image.in_memory:
                self._complete(run)
            else:
                self._pool.submit(self._complete, run)
        if self._ring is not None and self._ring.in_flight:
            # Reads from the page cache are done within the submission: taken now, not after
            # a round through the event loop for their eventfd.
            self._ring_done()

    def _to_ring(self, runs: list[list[Request]]) -> list[list[Request]]:
        """Queue and submit the runs the ring takes (reads and writes sure to be valid, and
        flushes); returns the others, for the workers, which also report the errors."""
        ring, image, rest = self._ring, self.image, []
        assert ring is not None
        if self._ring_broken:
            return runs
        with self._ring_lock:
            for run in runs:
                first, tag = run[0], next(self._ring_tags)
                iov = None
                if image is None:
                    queued = False
                elif first.kind == VIRTIO_BLK_T_FLUSH:
                    queued = ring.fsync(image.fd, tag)
                elif first.kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
                    reading = first.kind == VIRTIO_BLK_T_IN
                    iov = IoVec.join([r.data_in if reading else r.data_out for r in run]) if len(run) > 1 \
                        else first.data_in if reading else first.data_out
                    total = iov.total
                    if total % SECTOR_SIZE or first.sector + total // SECTOR_SIZE > self.capacity \
                            or (not reading and image.read_only):
                        queued = False
                    else:
                        op = ring.readv if reading else ring.writev
                        queued = op(image.fd, iov.address, iov.count, first.sector * SECTOR_SIZE, tag)
                        if not queued:
                            self.counters["io_engine_throttled_events"] += 1
                else:
                    queued = False
                if queued:
                    self._ring_runs[tag] = (run, iov)
                else:
                    rest.append(run)
            try:
                ring.submit()
            except OSError as e:
                # Not EINTR or EAGAIN (submit retries those): the ring is of no more use.
                self._ring_broken = True
                self.fail(f"io_uring: {e.strerror}")
        return rest

    def _ring_done(self) -> None:
        """Complete what the ring has done (the I/O thread, or a thread waiting for the disk to
        be idle); a request the kernel failed, or did in part, goes to the workers, which do it
        again and report what is wrong."""
        assert self._ring is not None
        with self._ring_lock:
            for tag, res in self._ring.reap():
                run, iov = self._ring_runs.pop(tag, (None, None))
                if run is None:         # given up on (the ring broke)
                    continue
                if res != (0 if iov is None else iov.total):
                    self._pool.submit(self._complete, run)
                    continue
                reading = run[0].kind == VIRTIO_BLK_T_IN
                for r in run:
                    r.status[0] = VIRTIO_BLK_S_OK
                self._finish(run, [1 + (r.data_in.total if reading else 0) for r in run])

    def _complete(self, run: list[Request]) -> None:
        """Carry out ``run`` and put its requests on the used ring (a pool thread)."""
        written = self._execute_merged(run) if len(run) > 1 else None
        if written is None:
            written = [self._execute(r) for r in run]
        self._finish(run, written)

    def _finish(self, run: list[Request], written: list[int]) -> None:
        """Put ``run``'s requests, done, on the used ring and tell the driver."""
        with self._used_lock:
            active = self.active
            if not self.broken and active is not None:
                for request, n in zip(run, written, strict=True):
                    active.queues[0].add_used(request.chain, n)
                active.interrupt.signal_used(active.queues[0])
        with self._idle:
            self._in_flight -= len(run)
            if not self._in_flight:
                self._idle.notify_all()

    def _execute_merged(self, run: list[Request]) -> list[int] | None:
        """One preadv/pwritev for contiguous requests; None to fall back to one by one."""
        first, kind = run[0], run[0].kind
        iov = IoVec.join([r.data_in if kind == VIRTIO_BLK_T_IN else r.data_out for r in run])
        try:
            self._check_range(first.sector, iov.total)
            if kind == VIRTIO_BLK_T_IN:
                self._image().read(first.sector * SECTOR_SIZE, iov)
            elif self.read_only:
                return None
            else:
                self._image().write(first.sector * SECTOR_SIZE, iov)
        except (RequestError, OSError):
            return None             # let each request find and report its own error
        for r in run:
            r.status[0] = VIRTIO_BLK_S_OK
        return [1 + (r.data_in.total if kind == VIRTIO_BLK_T_IN else 0) for r in run]

    def _wait_idle(self) -> int:
        """Wait for the requests in flight, QUIESCE_TIMEOUT at most; how many are left. The
        ring's completions are taken here too, as the I/O thread may be paused."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        while True:
            if self._ring is not None:
                self._ring_done()
                if self._ring_broken:
                    self._give_up_ring()
            with self._idle:
                left = deadline - time.monotonic()
                if not self._in_flight or left <= 0:
                    return self._in_flight
                self._idle.wait(min(left, 0.01) if self._ring_runs else left)

    def _give_up_ring(self) -> None:
        """A broken ring's requests will never be reaped: they end as I/O errors (the device
        is broken: their chains are not given back)."""
        with self._ring_lock:
            runs, self._ring_runs = list(self._ring_runs.values()), {}
        for run, _ in runs:
            for r in run:
                r.status[0] = VIRTIO_BLK_S_IOERR
            self._finish(run, [1] * len(run))

    def quiesce(self) -> None:
        if left := self._wait_idle():
            raise DeviceBusyError(f"{self.name}: {left} requests still in flight after "
                                  f"{QUIESCE_TIMEOUT:g} s (is the disk's storage stuck?)")

    def prepare_save(self) -> None:
        """Requests in flight finish first: their chains cannot be given back, as they
        complete out of order."""
        from ...persist import SaveError
        try:
            self.quiesce()
        except DeviceBusyError as e:
            raise SaveError(str(e)) from e

    def _unthrottled(self) -> None:
        if self.active is not None and not self.broken:
            self.queue_notify(0)

    def reset(self) -> None:
        """Requests already handed out finish first (4.2.2.1: reset waits for them)."""
        self._wait_idle()
        self.rate_limiter.reset()
        super().reset()

    def _execute(self, r: Request) -> int:
        """Carry out one request; returns the bytes written to the driver's buffers."""
        written = 1
        try:
            if r.kind == VIRTIO_BLK_T_IN:
                self._check_range(r.sector, r.data_in.total)
                self._image().read(r.sector * SECTOR_SIZE, r.data_in)
                written += r.data_in.total
            elif r.kind == VIRTIO_BLK_T_OUT:
                if self.read_only:
                    raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
                self._check_range(r.sector, r.data_out.total)
                self._image().write(r.sector * SECTOR_SIZE, r.data_out)
            elif r.kind == VIRTIO_BLK_T_FLUSH:
                self._image().flush()
            elif r.kind == VIRTIO_BLK_T_GET_ID:
                written += r.data_in.fill(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
            elif r.kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                self._ranges(r.kind, r.data_out.tobytes())
            else:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {r.kind}")
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            log.debug("%s: %s", self.name, e)
            status, written = e.status, 1
        except OSError as e:
            log.warning("%s: I/O error: %s", self.name, e)
            status, written = VIRTIO_BLK_S_IOERR, 1
        r.status[0] = status
        return written

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"transfer of {length} bytes is not whole sectors")
        if sector * SECTOR_SIZE + length > self.capacity * SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"sector {sector} + {length} bytes is beyond the disk")

    def _ranges(self, kind: int, data: bytes) -> None:
        if self.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "discard or write zeroes on a read-only disk")
        if not data or len(data) % _SEGMENT.size:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "malformed discard/write-zeroes segments")
        for sector, count, flags in _SEGMENT.iter_unpack(data):
            self._check_range(sector, count * SECTOR_SIZE)
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if kind == VIRTIO_BLK_T_DISCARD:
                if flags:
                    raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard with flags set")
                self._image().discard(offset, length)
            else:
                self._image().write_zeroes(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))

    def _image(self) -> BlockFile:
        if self.image is None:
            raise RequestError(VIRTIO_BLK_S_IOERR, "no disk in this slot")
        return self.image

    def close(self) -> None:
        self._wait_idle()
        if self._ring is not None:
            self._ring.close()
        if self.image is not None:
            self.image.close()


# The counters (Firecracker's block metrics) a request of each kind adds to: its count, its bytes.
_COUNTED = {VIRTIO_BLK_T_IN: ("read_count", "read_bytes"), VIRTIO_BLK_T_OUT: ("write_count", "write_bytes"),
            VIRTIO_BLK_T_FLUSH: ("flush_count", "")}


def _data_bytes(r: Request) -> int:
    """The bytes a request moves, for the rate limiter: a read's or a write's data, else 0."""
    if r.kind == VIRTIO_BLK_T_IN:
        return r.data_in.total
    return r.data_out.total if r.kind == VIRTIO_BLK_T_OUT else 0


def _parse(chain: DescriptorChain, mem: GuestMemory) -> Request:
    """Check the request's shape; QueueError if it breaks the rules (5.2.6). The header,
    data and status byte may be split across descriptors in any way (virtio 1.2, 2.6.4)."""
    addrs, lengths, readable = chain.addrs, chain.lengths, chain.readable_count
    if readable == len(addrs) or lengths[-1] < 1:
        raise QueueError("block request without a writable status byte (5.2.6)")
    if readable and lengths[0] == _HEADER.size:       # as Linux writes it: the header alone
        header, data_out = mem.read(addrs[0], _HEADER.size), chain.part_iovec(1, readable)
    else:
        parts, out_addrs, out_lengths = _split(addrs[:readable], lengths[:readable], _HEADER.size)
        header, data_out = b"".join(mem.views(*parts)), mem.iovec(out_addrs, out_lengths)
    if len(header) < _HEADER.size:
        raise QueueError("block request header shorter than 16 bytes")
    kind, _, sector = _HEADER.unpack(header)
    status = mem.view(addrs[-1] + lengths[-1] - 1, 1)
    if lengths[-1] == 1:                # the status byte alone, as Linux writes it: not data
        data_in = chain.part_iovec(readable, len(addrs) - 1)
    else:
        writable = chain.part_iovec(readable)
        pairs = writable.pairs
        pairs[-1] -= 1
        data_in = IoVec(pairs, writable.owner)
    if kind == VIRTIO_BLK_T_IN and data_out.total:
        raise QueueError("read request with device-readable data buffers")
    if kind == VIRTIO_BLK_T_OUT and data_in.total:
        raise QueueError("write request with device-writable data buffers")
    return Request(chain, kind, sector, data_out, data_in, status)


def _split(addrs: list[int], lengths: list[int], n: int) -> tuple[Buffers, list[int], list[int]]:
    """The first ``n`` bytes of the buffers (fewer if they hold less), and the buffers after."""
    i = 0
    head: Buffers = ([], [])
    while n and i < len(addrs):
        take = min(n, lengths[i])
        head[0].append(addrs[i])
        head[1].append(take)
        n -= take
        if take < lengths[i]:           # the rest of this buffer comes after
            return head, [addrs[i] + take, *addrs[i + 1:]], [lengths[i] - take, *lengths[i + 1:]]
        i += 1
    return head, addrs[i:], lengths[i:]


def _merge(requests: list[Request]) -> list[list[Request]]:
    """Runs of reads or writes that are contiguous on disk, as QEMU's virtio-blk
    merges them (virtio_blk_submit_multireq); everything else runs alone."""
    if len(requests) == 1:          # the usual case at queue depth 1: nothing to sort
        return [requests]
    runs: list[list[Request]] = []
    for kind, data in ((VIRTIO_BLK_T_IN, "data_in"), (VIRTIO_BLK_T_OUT, "data_out")):
        run: list[Request] = []
        count = size = 0
        for r in sorted((r for r in requests if r.kind == kind), key=lambda r: r.sector):
            iov: IoVec = getattr(r, data)
            start = r.sector * SECTOR_SIZE
            if run and (start != run[0].sector * SECTOR_SIZE + size or iov.total % SECTOR_SIZE
                        or count + iov.count > IOV_MAX or size + iov.total > MAX_MERGE_BYTES):
                runs.append(run)
                run, count, size = [], 0, 0
            run.append(r)
            count += iov.count
            size += iov.total
        if run:
            runs.append(run)
    runs += [[r] for r in requests if r.kind not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT)]
    return runs
