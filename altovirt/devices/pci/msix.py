"""MSI-X (PCI 3.0, 6.8.2): a table of message vectors and their pending bits in a BAR.

Each vector is an eventfd the device (or a back end in the kernel) writes; the VMM has KVM
turn it into the vector's message (an irqfd on a GSI routed as MSI). A masked vector, or
every vector while the function is masked or MSI-X is off, has no route: the eventfd keeps
its count, and KVM delivers it the moment the route comes back (binding an irqfd looks at
the eventfd), which is what the Pending Bit Array would otherwise carry.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Protocol

from .config import CAP_ID_MSIX, ConfigSpace

ENTRY_SIZE = 16                 # Message Address, Upper Address, Data, Vector Control
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1
NO_VECTOR = 0xFFFF              # virtio 1.2, 4.1.4.3: the driver's "no vector"


class MsiMessage(NamedTuple):
    address_lo: int
    address_hi: int
    data: int


class MsiVectors(Protocol):
    """What delivers a function's vectors: ``fds[i]`` raises vector i, once ``route(i, m)``
    gave it message ``m`` (None: the vector is masked or off)."""

    fds: list[int]

    def route(self, vector: int, message: MsiMessage | None) -> None: ...


class Msix:
    """The capability in ``config`` and the table and PBA it points at (in BAR ``bar`` at
    ``table_offset`` and ``pba_offset``), for ``len(vectors.fds)`` vectors."""

    def __init__(self, config: ConfigSpace, vectors: MsiVectors, bar: int, table_offset: int,
                 pba_offset: int) -> None:
        self.count = len(vectors.fds)
        if not 1 <= self.count <= 2048:
            raise ValueError(f"MSI-X: {self.count} vectors; a function has 1 to 2048")
        self.vectors = vectors
        self.config = config
        body = struct.pack("<HII", self.count - 1, table_offset | bar, pba_offset | bar)
        self.cap = config.add_capability(CAP_ID_MSIX, body, wmask=struct.pack("<H", CONTROL_ENABLE
                                                                              | CONTROL_FUNCTION_MASK))
        self.table = bytearray(ENTRY_SIZE * self.count)
        self._routes: list[MsiMessage | None] = [None] * self.count
        self.reset()

    @property
    def control(self) -> int:
        return self.config.get(self.cap + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    def reset(self) -> None:
        """Every vector masked and MSI-X off (as after a function reset)."""
        self.config.set(self.cap + 2, 2, self.count - 1, wmask=CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
        for v in range(self.count):
            struct.pack_into("<IIII", self.table, v * ENTRY_SIZE, 0, 0, 0, VECTOR_MASKED)
        self.update()

    def control_written(self, offset: int, size: int) -> None:
        """A configuration write at ``offset``: if it reached Message Control, vectors may
        have come on or gone off."""
        if offset < self.cap + 4 and offset + size > self.cap + 2:
            self.update()

    # --- the table and PBA, in the BAR ---
    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return 0
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        """A driver's write to the table; malformed ones (not a dword or qword within it) are
        dropped. Only the Vector Control's mask bit is writable in that dword."""
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return
        for at in range(offset, offset + size, 4):
            word = value >> (8 * (at - offset)) & 0xFFFFFFFF
            if at % ENTRY_SIZE == 12:
                word &= VECTOR_MASKED
            struct.pack_into("<I", self.table, at, word)
        self.update(offset // ENTRY_SIZE)

    def pba_read(self, offset: int, size: int) -> int:
        """Nothing is pending here: a masked vector's count waits in its eventfd."""
        return 0

    # --- routes ---
    def message(self, vector: int) -> MsiMessage | None:
        """What ``vector`` sends now: None if it is masked or MSI-X is off or masked."""
        control = self.control
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, vector * ENTRY_SIZE)
        if not control & CONTROL_ENABLE or control & CONTROL_FUNCTION_MASK or ctrl & VECTOR_MASKED:
            return None
        return MsiMessage(lo, hi, data)

    def update(self, only: int | None = None) -> None:
        for v in range(self.count) if only is None else (only,):
            message = self.message(v)
            if message != self._routes[v]:
                self._routes[v] = message
                self.vectors.route(v, message)
