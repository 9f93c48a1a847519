"""A minimal io_uring for the virtio-blk device's "Async" io_engine: READV, WRITEV and FSYNC.

The ring is driven with the raw system calls (liburing's helpers are inline
functions: there is nothing to call through ctypes) and shared mappings of
the SQ ring, the CQ ring (the same mapping under IORING_FEAT_SINGLE_MMAP) and
the SQE array. Completions are announced on a registered eventfd, which the
caller watches in its epoll loop and answers with :meth:`Ring.reap`. A ring
belongs to one thread: nothing here is locked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct

from . import BackendError

# arm64 takes include/uapi/asm-generic/unistd.h; x86_64's syscall_64.tbl has the same numbers.
SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427

# include/uapi/linux/io_uring.h
IORING_SETUP_CLAMP = 1 << 4         # clamp an oversized entries count instead of failing
IORING_SETUP_SUBMIT_ALL = 1 << 7    # 5.18: keep submitting past an SQE that fails to start
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_FSYNC_DATASYNC = 1 << 0
IORING_REGISTER_EVENTFD = 4

_u32 = ctypes.c_uint32


class io_sqring_offsets(ctypes.Structure):
    _fields_ = [("head", _u32), ("tail", _u32), ("ring_mask", _u32), ("ring_entries", _u32),
                ("flags", _u32), ("dropped", _u32), ("array", _u32), ("resv1", _u32),
                ("resv2", ctypes.c_uint64)]


class io_cqring_offsets(ctypes.Structure):
    _fields_ = [("head", _u32), ("tail", _u32), ("ring_mask", _u32), ("ring_entries", _u32),
                ("overflow", _u32), ("cqes", _u32), ("flags", _u32), ("resv1", _u32),
                ("resv2", ctypes.c_uint64)]


class io_uring_params(ctypes.Structure):
    _fields_ = [("sq_entries", _u32), ("cq_entries", _u32), ("flags", _u32),
                ("sq_thread_cpu", _u32), ("sq_thread_idle", _u32), ("features", _u32),
                ("wq_fd", _u32), ("resv", _u32 * 3),
                ("sq_off", io_sqring_offsets), ("cq_off", io_cqring_offsets)]


# struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags/fsync_flags,
# user_data, buf_index, personality, splice_fd_in, then addr3 and padding. Every field is written
# on every use, so no stale buf_index or personality from an earlier request survives in a slot.
_SQE = struct.Struct("=BBHiQQIIQHHi16x")
# struct io_uring_cqe (16 bytes): user_data, res, flags.
_CQE = struct.Struct("=QiI")
assert _SQE.size == 64 and _CQE.size == 16 and ctypes.sizeof(io_uring_params) == 120

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
# Every argument as a full register, so no variadic int leaves garbage in the upper half.
_syscall.argtypes = [ctypes.c_long] * 7
_syscall.restype = ctypes.c_long


class UringError(BackendError):
    """io_uring cannot be set up or refused a call; ``errno`` is the kernel's."""


def _call(nr: int, a: int, b: int = 0, c: int = 0, d: int = 0, e: int = 0, f: int = 0) -> int:
    ret: int = _syscall(nr, a, b, c, d, e, f)
    if ret < 0:
        err = ctypes.get_errno()
        raise UringError(err, os.strerror(err))
    return ret


_WHY = {errno.ENOSYS: "ENOSYS: the kernel is built without io_uring",
        errno.EPERM: "EPERM: refused, most likely by a seccomp filter (a container runtime's default)",
        errno.ENOMEM: "ENOMEM: no memory for the rings (before 5.12, RLIMIT_MEMLOCK counts them)"}


def _why(err: int) -> str:
    if err == errno.EPERM:
        with contextlib.suppress(OSError), open("/proc/sys/kernel/io_uring_disabled") as f:
            if (disabled := f.read().strip()) != "0":
                return f"EPERM: /proc/sys/kernel/io_uring_disabled is {disabled}"
    return _WHY.get(err) or f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


def _setup(entries: int) -> tuple[int, io_uring_params]:
    err = errno.EINVAL
    for flags in (IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL, IORING_SETUP_CLAMP):
        p = io_uring_params(flags=flags)
        fd: int = _syscall(SYS_io_uring_setup, entries, ctypes.addressof(p), 0, 0, 0, 0)
        if fd >= 0:
            return fd, p
        err = ctypes.get_errno()
        if err != errno.EINVAL:     # EINVAL may be SUBMIT_ALL, unknown before 5.18: try without
            break
    raise UringError(err, f"io_uring_setup: {_why(err)}")


def unavailable() -> str | None:
    """None if this kernel gives io_uring to this process, else one line why.

    It sets up, maps and closes a small ring, so every step a :class:`Ring` takes is tried.
    """
    try:
        Ring(2).close()
    except UringError as e:
        return e.strerror
    return None


class Ring:
    """One io_uring with ``entries`` SQEs (clamped by the kernel) and twice as many CQEs.

    ``readv``, ``writev`` and ``fsync`` queue a request and return False, queueing nothing, when
    the SQ is full or the CQ could not hold one more completion (so completions never overflow);
    :meth:`submit` hands the queued requests to the kernel and :meth:`reap` collects results.
    """

    def __init__(self, entries: int = 128) -> None:
        self._fd, p = _setup(entries)
        self._sq_entries, self._cq_entries = p.sq_entries, p.cq_entries
        sq, cq = p.sq_off, p.cq_off
        sq_size = sq.array + p.sq_entries * 4
        cq_size = cq.cqes + p.cq_entries * _CQE.size
        single = bool(p.features & IORING_FEAT_SINGLE_MMAP)
        if single:
            sq_size = cq_size = max(sq_size, cq_size)
        self._maps: list[mmap.mmap] = []
        self._efd = -1
        try:
            self._sq = self._map(sq_size, IORING_OFF_SQ_RING)
            self._cq = self._sq if single else self._map(cq_size, IORING_OFF_CQ_RING)
            self._sqes = self._map(p.sq_entries * _SQE.size, IORING_OFF_SQES)
            # Views on the shared words; the masks and the arrays' places never change.
            self._sq_head = _u32.from_buffer(self._sq, sq.head)
            self._sq_tail = _u32.from_buffer(self._sq, sq.tail)
            self._cq_head = _u32.from_buffer(self._cq, cq.head)
            self._cq_tail = _u32.from_buffer(self._cq, cq.tail)
            self._sq_mask = _u32.from_buffer(self._sq, sq.ring_mask).value
            self._cq_mask = _u32.from_buffer(self._cq, cq.ring_mask).value
            self._cqes = cq.cqes
            # SQEs are used in ring order, so the indirection array is the identity once and for all.
            for i in range(p.sq_entries):
                struct.pack_into("=I", self._sq, sq.array + 4 * i, i)
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int32(self._efd)     # named, so it outlives the call that reads it
            _call(SYS_io_uring_register, self._fd, IORING_REGISTER_EVENTFD, ctypes.addressof(efd), 1)
        except (OSError, ValueError) as e:
            self.close()
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            raise UringError(err, f"io_uring set-up: {_why(err)}") from None
        self._tail = self._sq_tail.value    # ours; the kernel sees it at submit
        self._in_flight = 0

    def _map(self, size: int, offset: int) -> mmap.mmap:
        # Python's mmap keeps a dup of the ring's fd, closed again by mmap.close().
        m = mmap.mmap(self._fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    @property
    def eventfd(self) -> int:
        """An eventfd (non-blocking, close-on-exec), readable once a completion is posted."""
        return self._efd

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet reaped."""
        return self._in_flight

    def _push(self, op: int, fd: int, off: int, addr: int, length: int, op_flags: int, tag: int) -> bool:
        if self._fd < 0:
            raise ValueError("operation on a closed io_uring")
        pending = (self._tail - self._sq_head.value) & 0xFFFFFFFF
        if pending >= self._sq_entries or self._in_flight + pending >= self._cq_entries:
            return False
        _SQE.pack_into(self._sqes, (self._tail & self._sq_mask) * _SQE.size,
                       op, 0, 0, fd, off, addr, length, op_flags, tag, 0, 0, 0)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        # Publish the tail after the SQE. A ctypes store is a plain 32-bit store: on x86 (TSO)
        # that is exactly the release the kernel pairs with its acquire-load of the tail; on arm64
        # it has no barrier, but the kernel reads the tail only inside io_uring_enter on this very
        # thread (no SQPOLL), after the syscall entry orders everything written before it.
        self._sq_tail.value = self._tail
        return True

    def readv(self, fd: int, iov_address: int, iov_count: int, offset: int, tag: int) -> bool:
        """Queue IORING_OP_READV of ``iov_count`` iovecs at ``iov_address`` from ``offset``.

        The iovec array and its buffers must stay valid until the completion is reaped.
        """
        return self._push(IORING_OP_READV, fd, offset, iov_address, iov_count, 0, tag)

    def writev(self, fd: int, iov_address: int, iov_count: int, offset: int, tag: int) -> bool:
        """Queue IORING_OP_WRITEV, as :meth:`readv`."""
        return self._push(IORING_OP_WRITEV, fd, offset, iov_address, iov_count, 0, tag)

    def fsync(self, fd: int, tag: int, datasync: bool = True) -> bool:
        """Queue IORING_OP_FSYNC of the whole file, an fdatasync unless ``datasync`` is False."""
        return self._push(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC if datasync else 0, tag)

    def submit(self) -> int:
        """Hand every queued request to the kernel; return how many it took.

        EINTR is retried; EAGAIN and EBUSY (no memory for requests, completions backed up) are
        retried a few times and then left: the requests stay queued for the next call.
        """
        submitted = 0
        retries = 3
        while (pending := (self._tail - self._sq_head.value) & 0xFFFFFFFF) and retries:
            try:
                n = _call(SYS_io_uring_enter, self._fd, pending)
            except UringError as e:
                if e.errno not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise
                if e.errno != errno.EINTR:
                    retries -= 1
                continue
            if n == 0:
                break
            # Fewer than pending: an SQE failed to start (before SUBMIT_ALL); go on past it.
            submitted += n
        self._in_flight += submitted
        return submitted

    def reap(self) -> list[tuple[int, int]]:
        """Reset the eventfd and return every posted completion as (tag, res).

        ``res`` is the kernel's: a byte count, 0, or a negative errno. The eventfd is read first,
        so a completion posted while reaping leaves it readable for the next round.
        """
        try:    # noqa: SIM105 (suppress() costs more than the read, on every reap)
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        head = self._cq_head.value
        # The tail is loaded before the CQEs it covers, the head stored after they are copied out.
        # ctypes gives plain loads and stores: on x86 (TSO) that is all acquire/release compile to;
        # on arm64 they lack the barriers in theory, but the thousands of interpreter instructions
        # between tail load, CQE loads and head store make that harmless in practice.
        tail = self._cq_tail.value
        done = []
        while head != tail:
            tag, res, _ = _CQE.unpack_from(self._cq, self._cqes + (head & self._cq_mask) * _CQE.size)
            done.append((tag, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        self._in_flight -= len(done)
        return done

    def close(self) -> None:
        """Close the eventfd, unmap the rings and close the ring; idempotent.

        The kernel cancels or finishes requests still in flight in the background, after this
        returns: their buffers must outlive them, so reap until ``in_flight`` is 0 when it matters.
        """
        if self._fd < 0:
            return
        if self._efd >= 0:
            # Not unregistered: closing the ring drops it, and a confined thread (the VMM's
            # teardown) may not call io_uring_register.
            os.close(self._efd)
            self._efd = -1
        # The ctypes views export the maps' buffers; they go first or mmap.close() refuses.
        for name in ("_sq_head", "_sq_tail", "_cq_head", "_cq_tail"):
            self.__dict__.pop(name, None)
        for m in self._maps:
            m.close()
        self._maps.clear()
        os.close(self._fd)
        self._fd = -1
