"""A function's configuration space: the type 0 header, BARs and the capability list
(PCI Local Bus 3.0, 6.1-6.7; PCI Express Base 4.0, 7.5 and 7.6).

What a driver may change is a write mask a byte, and what it clears by writing ones a
second mask (the Status register's error bits), so that any value a guest writes
anywhere leaves only what a real function would keep. BARs are sized the usual way:
their low address bits are not writable, so writing all ones reads back the size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONFIG_SIZE = 4096              # PCIe's extended space (ECAM); the first 256 bytes are PCI's
# Header registers (PCI 3.0, 6.1)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
HEADER_MULTI_FUNCTION = 0x80
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
HEADER_END = 0x40
# Command and Status bits
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER, COMMAND_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
STATUS_CAP_LIST = 1 << 4
STATUS_ERRORS = 0xF900          # parity, signalled/received aborts, SERR: write 1 to clear
# BAR low bits (6.2.5.1)
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8
BAR_ADDRESS_MASK = ~0xF & 0xFFFFFFFF
NUM_BARS = 6
# Capability IDs (PCI 3.0, appendix H)
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11


@dataclass
class Bar:
    """A memory BAR of ``size`` bytes (a power of two, at least 4 KiB so that it owns its
    pages), 64-bit unless ``mem64`` is False, placed at ``addr`` by the VMM at start."""

    index: int
    size: int
    addr: int = 0
    mem64: bool = True
    prefetchable: bool = False


class ConfigSpace:
    """The bytes a function shows in configuration space and the rules for writing them."""

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, header_type: int = 0,
                 interrupt_pin: int = 0) -> None:
        """``interrupt_pin``: 1 to 4 for INTA# to INTD#, 0 for none (6.2.4)."""
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * NUM_BARS
        self._last_cap = 0
        self._next_cap = HEADER_END
        self.set(VENDOR_ID, 2, vendor)
        self.set(DEVICE_ID, 2, device)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_PROG, 3, class_code)
        self.set(HEADER_TYPE, 1, header_type)
        if header_type == 0:
            self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
            self.set(SUBSYSTEM_ID, 2, subsystem)
        self.set(INTERRUPT_LINE, 1, 0xFF, wmask=0xFF)           # scratch for the OS
        self.set(INTERRUPT_PIN, 1, interrupt_pin)
        self.set(COMMAND, 2, 0, wmask=COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE)
        self.set(STATUS, 2, 0, w1cmask=STATUS_ERRORS)

    # --- building ---
    def set(self, offset: int, size: int, value: int, *, wmask: int = 0, w1cmask: int = 0) -> None:
        """Put ``value`` at ``offset``, with what a driver may write (``wmask``) and clear
        (``w1cmask``) there."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1cmask.to_bytes(size, "little")

    def add_bar(self, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < 4096:
            raise ValueError(f"BAR{bar.index}: size {bar.size:#x} is not a power of two of 4 KiB or more")
        kind = (BAR_MEM64 if bar.mem64 else 0) | (BAR_PREFETCH if bar.prefetchable else 0)
        offset = BAR0 + 4 * bar.index
        size_mask = ~(bar.size - 1) & ((1 << 64) - 1)
        self.set(offset, 4, (bar.addr & BAR_ADDRESS_MASK) | kind, wmask=size_mask & BAR_ADDRESS_MASK)
        if bar.mem64:
            self.set(offset + 4, 4, bar.addr >> 32, wmask=size_mask >> 32)
        self.bars[bar.index] = bar

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"", w1cmask: bytes = b"") -> int:
        """Append a capability (its ID and next pointer, then ``body``), dword-aligned, and
        return its offset; the masks cover ``body`` from its start."""
        if max(len(wmask), len(w1cmask)) > len(body):
            raise ValueError("a capability's masks reach past it")
        offset = self._next_cap
        end = offset + 2 + len(body)
        if end > 0x100:
            raise ValueError("the capabilities do not fit in the first 256 bytes")
        self.data[offset:end] = bytes((cap_id, 0)) + body
        self.wmask[offset + 2:offset + 2 + len(wmask)] = wmask
        self.w1cmask[offset + 2:offset + 2 + len(w1cmask)] = w1cmask
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[CAPABILITY_LIST] = offset
            self.data[STATUS] |= STATUS_CAP_LIST
        self._last_cap = offset
        self._next_cap = (end + 3) & ~3
        return offset

    # --- the driver's accesses ---
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or offset + size > CONFIG_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> bool:
        """Apply a driver's write through the masks; False if it was malformed and dropped."""
        if size not in (1, 2, 4) or offset % size or offset + size > CONFIG_SIZE:
            log.debug("configuration write of %d bytes at %#x dropped", size, offset)
            return False
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            at = offset + i
            keep = self.data[at] & ~self.wmask[at]
            new = keep | (byte & self.wmask[at])
            self.data[at] = new & ~(byte & self.w1cmask[at])
        return True

    def fits(self, saved: bytes) -> bool:
        """Whether ``saved`` is this function's configuration space as some driver may have
        left it: same size, and equal wherever no driver can write (IDs, BAR sizes,
        capabilities)."""
        return len(saved) == len(self.data) and all(
            saved[i] == self.data[i] for i, mask in enumerate(self.wmask) if not mask and not self.w1cmask[i])

    def bar_address(self, bar: Bar) -> int:
        """Where the driver put ``bar`` (the register's value, decoding on or off)."""
        offset = BAR0 + 4 * bar.index
        addr = self.get(offset, 4) & BAR_ADDRESS_MASK
        return addr | self.get(offset + 4, 4) << 32 if bar.mem64 else addr

    @property
    def intx_enabled(self) -> bool:
        return not self.get(COMMAND, 2) & COMMAND_INTX_DISABLE

    @property
    def memory_enabled(self) -> bool:
        return bool(self.get(COMMAND, 2) & COMMAND_MEMORY)
