"""What an architecture says of its board's own devices (``BOARD`` in :mod:`altovirt.arch`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoardDevice:
    """Where one of the board's own devices sits: its MMIO window, and the KVM_IRQ_LINE
    number of its level interrupt (0: none)."""

    base: int
    size: int
    irq_line: int = 0


@dataclass(frozen=True)
class PciLayout:
    """A PCIe host bridge's ECAM and BAR windows, (base, size) each, and the GSIs of its
    INTA# to INTD# lines."""

    ecam: tuple[int, int]
    mmio32: tuple[int, int]
    mmio64: tuple[int, int]
    intx: tuple[int, int, int, int]
