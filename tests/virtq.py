"""A test-side virtio driver's view of a split virtqueue, laid out in guest RAM."""

from __future__ import annotations

import struct

from altovirt.memory import GuestMemory

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class DriverQueue:
    """Writes descriptors and the available ring the way a guest driver does."""

    def __init__(self, mem: GuestMemory, base: int, size: int) -> None:
        self.mem, self.size = mem, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0
        self.next_desc = 0
        mem.write(base, bytes(self.used + 6 + 8 * size - base))

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0,
                   table: int | None = None) -> None:
        where = (self.desc if table is None else table) + 16 * index
        self.mem.write(where, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Add a chain of (addr, len, writable) buffers; returns its head."""
        head = self.next_desc
        for i, (addr, length, writable) in enumerate(buffers):
            index = (head + i) % self.size
            last = i == len(buffers) - 1
            self.write_desc(index, addr, length, (F_WRITE if writable else 0) | (0 if last else F_NEXT),
                            (index + 1) % self.size)
        self.next_desc = (head + len(buffers)) % self.size
        return head

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def used_elem(self, i: int) -> tuple[int, int]:
        head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (i % self.size), 8))
        return head, length

    def avail_event(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0])
