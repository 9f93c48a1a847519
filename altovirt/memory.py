"""Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO gap.

The memfd (rather than anonymous memory) lets later features hand guest RAM
to another process (vhost-user) or save it (snapshots) without copying.
Every guest-physical access goes through :meth:`GuestMemory.view`, which
refuses any range that is not entirely inside one RAM region: a guest (or a
bug) can never make us touch host memory outside guest RAM.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import mmap
import os
from dataclasses import dataclass

from .errors import AltoVirtError

# madvise(2) advice; the mmap module exposes these on Linux, named for clarity.
MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)


class GuestMemoryError(AltoVirtError, ValueError):
    """A guest-physical range that is not backed by RAM."""


@dataclass(frozen=True)
class Region:
    """A contiguous range of guest RAM: ``size`` bytes at ``gpa``, at ``offset`` in the memfd."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM of ``size`` bytes laid out by ``regions`` (see arch layout)."""

    def __init__(self, regions: list[Region], *, dontdump: bool = False) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self.size = sum(r.size for r in self.regions)
        self.fd = os.memfd_create("altovirt-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        if dontdump:
            self._map.madvise(MADV_DONTDUMP)
        # Huge pages where the host allows them for shmem (transparent_hugepage/shmem_enabled
        # advise or within_size), as QEMU asks for its RAM: fewer page-table entries for
        # KVM and for direct I/O into guest memory. Elsewhere this is a no-op.
        with contextlib.suppress(OSError):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._view = memoryview(self._map)
        # (first gpa, end gpa, memfd offset - gpa) of each region, for view()
        self._spans = tuple((r.gpa, r.end, r.offset - r.gpa) for r in self.regions)
        self._base = C.addressof(C.c_char.from_buffer(self._map))

    def host_address(self, region: Region) -> int:
        """The userspace address backing ``region``, for KVM_SET_USER_MEMORY_REGION."""
        return self._base + region.offset

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM [gpa, gpa+length), or GuestMemoryError."""
        # Every virtqueue buffer comes through here: plain tuples, no property calls.
        if length >= 0:
            end = gpa + length
            for start, stop, delta in self._spans:
                if start <= gpa and end <= stop:
                    off = gpa + delta
                    return self._view[off:off + length]
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def discard(self) -> None:
        """Zero all of guest RAM by handing its pages back to the host (a cold reset).
        KVM drops its mappings through the MMU notifier and faults in fresh zero pages."""
        self._map.madvise(mmap.MADV_REMOVE)

    def close(self) -> None:
        """Unmap and close. Views still held elsewhere (device queues) keep the
        mapping alive until they are dropped; the memfd is closed either way."""
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
