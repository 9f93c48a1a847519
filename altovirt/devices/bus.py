"""Port-I/O and MMIO buses: guest address -> (device, offset).

Devices implement :class:`BusDevice`. Accesses that hit no device read as
all ones and drop writes, as on a PC with nothing decoding the address; each
such address is logged once at debug level.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Protocol

from ..errors import AltoVirtError

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(AltoVirtError, ValueError):
    """Two devices claim overlapping ranges."""


class Bus:
    """Address ranges mapped to devices. Lookups are lock-free; changes are serialized."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []
        self._reported: set[int] = set()
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        with self._lock:
            i = bisect.bisect_right(self._starts, base)
            if (i and self._ranges[i - 1][1] > base) or \
                    (i < len(self._starts) and self._starts[i] < base + length):
                raise BusConflict(f"{self.name} range {base:#x}+{length:#x} overlaps a device")
            # Publish new lists in one assignment each so readers never see a half update.
            self._starts = [*self._starts[:i], base, *self._starts[i:]]
            self._ranges = [*self._ranges[:i], (base, base + length, device), *self._ranges[i:]]

    def remove(self, base: int) -> None:
        """Unmap the device whose range starts at ``base``."""
        with self._lock:
            i = self._starts.index(base)
            self._starts = [*self._starts[:i], *self._starts[i + 1:]]
            self._ranges = [*self._ranges[:i], *self._ranges[i + 1:]]

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        ranges = self._ranges
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, device = ranges[i]
            if addr < end:
                return device, addr - start
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed(addr, "read")
            return (1 << (8 * size)) - 1
        return hit[0].read(hit[1], size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed(addr, "write")
            return
        hit[0].write(hit[1], size, value)

    def _unclaimed(self, addr: int, what: str) -> None:
        if addr not in self._reported:
            self._reported.add(addr)
            log.debug("%s %s at unclaimed address %#x (logged once)", self.name, what, addr)
