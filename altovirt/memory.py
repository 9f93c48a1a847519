"""Guest RAM: anonymous memory (or a shared memfd), aligned to 2 MiB, split around the 32-bit MMIO gap.

RAM is allocated as QEMU and Firecracker allocate it by default: private
anonymous memory advised for transparent huge pages, which Linux hosts give
(``transparent_hugepage/enabled`` is ``madvise`` or ``always``), where shared
memory (a memfd) gets them only if the host turned them on for shmem. KVM maps
a guest's 2 MiB page with one nested-paging entry only where the host page is
huge and host and guest addresses agree modulo 2 MiB: hence the alignment.
Every guest-physical access goes through :meth:`GuestMemory.view` (or its
bulk forms, ``views`` and ``iovec``), which refuses any range that is not
entirely inside one RAM region: a guest (or a bug) can never make us touch
host memory outside guest RAM.

KVM's dirty log sees only the guest's own writes. The VMM's writes are noted by
the writer once they have landed (write, then :meth:`GuestMemory.mark_written`,
as rust-vmm's vm-memory marks its bitmap at the write): a mark made when a
buffer is merely handed out could be collected and sent by a live migration's
pass before the data arrives, and the page would then never be sent again.
"""

from __future__ import annotations

import array
import contextlib
import ctypes as C
import itertools
import mmap
import operator
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .errors import AltoVirtError

# madvise(2) advice; the mmap module exposes these on Linux, named for clarity.
MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)
MAP_FIXED = 0x10                # <sys/mman.h>: replace what is mapped at the address
HUGE_PAGE = 2 << 20             # x86-64's 2 MiB page
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1

# pagemap's last byte of an entry -> 1 if neither present (bit 7) nor swapped (bit 6)
_UNTOUCHED = bytes(int(not b & 0xC0) for b in range(256))

_libc = C.CDLL(None, use_errno=True)
_libc.mmap.restype = C.c_void_p
_libc.mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]


class GuestMemoryError(AltoVirtError, ValueError):
    """A guest-physical range that is not backed by RAM."""


class IoVec:
    """Buffers in this process's memory as ``struct iovec[count]``, what readv(2) takes:
    ``pairs`` holds each one's address and length as native 64-bit words; ``total`` bytes.
    ``owner`` keeps the memory they are in mapped while the IoVec lives (a view of it: the
    mapping cannot be closed while one is exported)."""

    __slots__ = ("_total", "count", "owner", "pairs")

    def __init__(self, pairs: array.array[int], owner: object, total: int | None = None) -> None:
        """``total``: the lengths' sum, if the caller knows it."""
        self.pairs, self.owner = pairs, owner
        self.count = len(pairs) // 2
        self._total = total

    @property
    def total(self) -> int:
        if self._total is None:         # worked out when wanted: most IoVecs are cut up first
            self._total = sum(self.pairs[1::2])
        return self._total

    @property
    def address(self) -> int:
        return int(self.pairs.buffer_info()[0])

    def part(self, first: int, last: int | None = None) -> IoVec:
        """Buffers ``first`` to ``last`` (not included)."""
        return IoVec(self.pairs[2 * first:None if last is None else 2 * last], self.owner)

    def buffers(self) -> Iterator[tuple[int, int]]:
        """Each buffer's (address, length)."""
        return zip(self.pairs[0::2], self.pairs[1::2], strict=True)

    def tobytes(self) -> bytes:
        return b"".join(C.string_at(address, length) for address, length in self.buffers())

    def fill(self, data: bytes) -> int:
        """Copy ``data`` into the buffers, in order, as much as fits; how many bytes."""
        done = 0
        for address, length in self.buffers():
            n = min(length, len(data) - done)
            C.memmove(address, data[done:done + n], n)
            done += n
        return done

    @staticmethod
    def of(buffer: mmap.mmap, length: int) -> IoVec:
        """The first ``length`` bytes of ``buffer``, memory of this process's own."""
        return IoVec(array.array("Q", (C.addressof(C.c_char.from_buffer(buffer)), length)), buffer)

    @staticmethod
    def join(iovs: Sequence[IoVec]) -> IoVec:
        pairs = array.array("Q")
        for iov in iovs:
            pairs += iov.pairs
        return IoVec(pairs, [iov.owner for iov in iovs])


@dataclass(frozen=True)
class Region:
    """A contiguous range of guest RAM: ``size`` bytes at ``gpa``, ``offset`` bytes into RAM."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM of ``size`` bytes laid out by ``regions`` (see arch layout)."""

    def __init__(self, regions: list[Region], *, dontdump: bool = False, shared: bool = False) -> None:
        """``shared``: RAM is a memfd mapped MAP_SHARED (StratoVirt's ``mem-share=on``), so that
        a vhost-user back end can map it too (:attr:`fd`, at offset ``Region.offset``)."""
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self.size = sum(r.size for r in self.regions)
        # 2 MiB more than asked, so that RAM can start on a 2 MiB boundary; the pages before
        # and after are never touched, so they cost address space only.
        self._map = mmap.mmap(-1, self.size + HUGE_PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._dontdump = dontdump
        self._file_backed = False
        start = C.addressof(C.c_char.from_buffer(self._map))
        self._pad = -start % HUGE_PAGE
        self._base = start + self._pad
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create("altovirt-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, self.size)
                self._map_fixed(mmap.MAP_SHARED, self.fd)
            except OSError:
                os.close(self.fd)
                self._map.close()
                raise
        else:
            self._advise()
        self._view = memoryview(self._map)[self._pad:self._pad + self.size]
        self._owner: memoryview | None = self._view[:0]     # what an IoVec holds (see IoVec)
        # (first gpa, end gpa, offset in RAM - gpa) of each region, for view()
        self._spans = tuple((r.gpa, r.end, r.offset - r.gpa) for r in self.regions)
        # While a live migration runs: a byte per page of RAM, set for each page the VMM wrote
        # (KVM's dirty log sees only the guest's writes). Swapped under the lock, so that a mark
        # lands either before a collection or after it, never in a bitmap already read.
        self._written: bytearray | None = None
        self._written_lock = threading.Lock()

    def _advise(self) -> None:
        if self._dontdump:
            self._map.madvise(MADV_DONTDUMP)
        # Not copied into a child process (QEMU does the same): a fork would otherwise make
        # every page copy-on-write under the running guest.
        self._map.madvise(mmap.MADV_DONTFORK)
        with contextlib.suppress(OSError):      # hosts without transparent huge pages
            self._map.madvise(mmap.MADV_HUGEPAGE)

    def _map_fixed(self, flags: int, fd: int) -> None:
        """Map ``fd`` (or anonymous memory) in place of RAM; private unless ``flags`` says
        MAP_SHARED."""
        sharing = 0 if flags & mmap.MAP_SHARED else mmap.MAP_PRIVATE
        got = _libc.mmap(self._base, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                         sharing | MAP_FIXED | flags, fd, 0)
        if got != self._base:
            err = C.get_errno()
            raise OSError(err, f"cannot map guest RAM: {os.strerror(err)}")
        self._advise()

    @property
    def ram(self) -> memoryview:
        """All of guest RAM, region after region (offsets as in :class:`Region`)."""
        return self._view

    def untouched_pages(self) -> bytes | None:
        """A byte per page of RAM, 1 where the page was never touched (neither in memory nor
        swapped out: it reads as zero without being read), from /proc/self/pagemap; None
        where that cannot be known (RAM mapped from a file, RAM shared with a back end that
        writes it through its own mapping, or no /proc, in a jail)."""
        if self._file_backed or self.fd is not None:
            return None
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            entries = os.pread(fd, (self.size >> PAGE_SHIFT) * 8, (self._base >> PAGE_SHIFT) * 8)
        except OSError:
            return None
        finally:
            os.close(fd)
        # Each entry is a little-endian u64: bit 63 present, bit 62 swapped, in its last byte.
        return entries[7::8].translate(_UNTOUCHED)

    def map_file(self, fd: int) -> None:
        """Put the first ``size`` bytes of file ``fd`` in place of guest RAM, copy-on-write
        (MAP_PRIVATE): pages are read in as the guest (or KVM) first touches them, and
        writes stay in this process. Used to restore a snapshot lazily; the addresses KVM
        and the devices hold stay valid (the mapping replaces RAM at the same place).
        Shared RAM stays the memfd its back end maps: the file is read into it."""
        if self.fd is not None:
            done = 0
            while done < self.size:
                n = os.preadv(fd, [self._view[done:]], done)
                if n <= 0:
                    raise OSError(0, f"the memory file ends at {done} bytes of {self.size}")
                done += n
            return
        self._map_fixed(0, fd)
        self._file_backed = True

    def host_address(self, region: Region) -> int:
        """The userspace address backing ``region``, for KVM_SET_USER_MEMORY_REGION."""
        return self._base + region.offset

    def _offset(self, gpa: int, length: int) -> int:
        """The offset in RAM of [gpa, gpa+length), or GuestMemoryError."""
        # Every virtqueue buffer comes through here: plain tuples, no property calls.
        if length >= 0:
            end = gpa + length
            for start, stop, delta in self._spans:
                if start <= gpa and end <= stop:
                    return gpa + delta
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM [gpa, gpa+length), or GuestMemoryError.
        Whoever writes through it calls :meth:`mark_written` once the bytes are in."""
        off = self._offset(gpa, length)
        return self._view[off:off + length]

    def _delta(self, addrs: Sequence[int], lengths: Sequence[int]) -> int | None:
        """``offset in RAM - gpa`` of the one region holding every buffer, checked with a few
        calls in C, not one per buffer; None where no one region holds them all (then each
        buffer is checked on its own)."""
        if addrs and min(lengths) >= 0:
            # The highest address plus the longest length: a bound, found without making an
            # object per buffer; where it says no, each buffer is checked after all.
            low, high = min(addrs), max(addrs) + max(lengths)
            for start, stop, delta in self._spans:
                if start <= low and high <= stop:
                    return delta
        return None

    def views(self, addrs: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """:meth:`view` of each ``addrs[i]``, ``lengths[i]``."""
        delta = self._delta(addrs, lengths)
        if delta is None:
            return list(map(self.view, addrs, lengths))
        ram = self._view
        return [ram[a + delta:a + delta + n] for a, n in zip(addrs, lengths, strict=True)]

    def iovec(self, addrs: Sequence[int], lengths: Sequence[int]) -> IoVec:
        """Each ``addrs[i]``, ``lengths[i]`` of guest RAM as the kernel takes a buffer, for
        preadv(2) and pwritev(2) straight into RAM with no Python object per buffer (a 1 MiB
        disk request has 256 of them); GuestMemoryError if one is not RAM. The addresses stay
        valid while the VM lives: RAM is replaced, if ever, at the same place (map_file)."""
        if len(addrs) < 2:              # a disk request's data, or none: no more to work out
            if not addrs:
                return IoVec(array.array("Q"), self._owner, 0)
            gpa, length = addrs[0], lengths[0]
            return IoVec(array.array("Q", (self._base + self._offset(gpa, length), length)), self._owner,
                         length)
        delta = self._delta(addrs, lengths)
        pairs = [0] * (2 * len(addrs))
        if delta is None:
            pairs[0::2] = map(self.host_address_of, addrs, lengths)
        else:
            pairs[0::2] = map(operator.add, addrs, itertools.repeat(self._base + delta))
        pairs[1::2] = lengths
        return IoVec(array.array("Q", pairs), self._owner)

    def host_address_of(self, gpa: int, length: int) -> int:
        """The userspace address of guest RAM [gpa, gpa+length), for the host kernel (vhost);
        GuestMemoryError if it is not RAM."""
        return self._base + self._offset(gpa, length)

    def track_writes(self, on: bool) -> None:
        """Start noting the pages the VMM writes (a fresh, empty set), or stop."""
        with self._written_lock:
            self._written = bytearray(self.size >> PAGE_SHIFT) if on else None

    def take_written(self) -> bytearray:
        """A byte per page of RAM, 1 for each page the VMM wrote since tracking started or since
        the last call; tracking goes on with an empty set."""
        with self._written_lock:
            written, self._written = self._written, bytearray(self.size >> PAGE_SHIFT)
        if written is None:
            raise RuntimeError("take_written() while writes are not tracked")
        return written

    def mark_written(self, gpa: int, length: int) -> None:
        """Note [gpa, gpa+length) as written by the VMM, after the write (while tracked).
        GuestMemoryError if the range is not RAM."""
        off = self._offset(gpa, length)
        # Unlocked first look: a write that lands before tracking starts is in RAM by then,
        # and a migration's first pass reads all of RAM after it starts.
        if self._written is not None and length:
            first, last = off >> PAGE_SHIFT, (off + length - 1) >> PAGE_SHIFT
            with self._written_lock:
                if self._written is not None:
                    self._written[first:last + 1] = b"\1" * (last + 1 - first)

    @property
    def tracking_writes(self) -> bool:
        return self._written is not None

    def mark_spans(self, spans: Iterable[tuple[int, int]]) -> None:
        """:meth:`mark_written` for each (gpa, length) of ``spans``."""
        if self._written is not None:           # a migration runs: rare, the check is cheap
            for gpa, length in spans:
                self.mark_written(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data
        self.mark_written(gpa, len(data))

    def discard_range(self, gpa: int, length: int) -> None:
        """Give the pages of [gpa, gpa+length) back to the host (a balloon's, or pages the guest
        reports free): the process's memory shrinks by them, and the guest finds them zero (or,
        mapped from a snapshot's file, as the file has them) if it uses them again.
        GuestMemoryError unless the range is page-aligned RAM."""
        if (gpa | length) & PAGE_MASK:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not page-aligned")
        offset = self._pad + self._offset(gpa, length)
        self._map.madvise(mmap.MADV_REMOVE if self.fd is not None else mmap.MADV_DONTNEED, offset, length)

    def discard(self) -> None:
        """Zero all of guest RAM by handing its pages back to the host (a cold reset).
        KVM drops its mappings through the MMU notifier and faults in fresh zero pages.
        RAM mapped from a snapshot's file is replaced by anonymous memory (dropping the
        private copies would bring back the file's pages, not zeros)."""
        if self._file_backed:
            self._map_fixed(mmap.MAP_ANONYMOUS, -1)
            self._file_backed = False
        elif self.fd is not None:           # the memfd's pages freed: they read as zero
            self._map.madvise(mmap.MADV_REMOVE, self._pad, self.size)
        else:
            self._map.madvise(mmap.MADV_DONTNEED)

    def copied_into_children(self, on: bool) -> None:
        """Whether a child process forked now gets guest RAM, copy-on-write (vm-fork's), or
        none of it (the default: see _advise)."""
        self._map.madvise(mmap.MADV_DOFORK if on else mmap.MADV_DONTFORK)

    def close(self) -> None:
        """Unmap. Views still held elsewhere (device queues, IoVecs) keep the mapping alive
        until they are dropped."""
        self._owner = None
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
