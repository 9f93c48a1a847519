"""An Arm PrimeCell PL011 UART (PL011 Technical Reference Manual, r1p5, DDI 0183G).

Transmit is immediate: the transmit FIFO is empty again by the next access, so the transmit
interrupt is raised after every byte, as QEMU's model does, until the driver masks it or
clears it. Receive takes bytes from the host through :meth:`Pl011.enqueue`; the receive
interrupt stands while any byte waits. The interrupt output is a level: ``irq(level)`` drives
the line (KVM_IRQ_LINE) whenever the masked status changes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .level import LevelLine

if TYPE_CHECKING:
    from .persist import Pl011State

# Register offsets (TRM 3.2).
UARTDR = 0x000
UARTRSR = 0x004
UARTFR = 0x018
UARTILPR = 0x020
UARTIBRD = 0x024
UARTFBRD = 0x028
UARTLCR_H = 0x02C
UARTCR = 0x030
UARTIFLS = 0x034
UARTIMSC = 0x038
UARTRIS = 0x03C
UARTMIS = 0x040
UARTICR = 0x044
UARTDMACR = 0x048
PERIPH_ID_BASE = 0xFE0
# UARTPeriphID0-3 and UARTPCellID0-3 (TRM 3.3.14-3.3.15), one byte a register.
IDS = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)

FR_RXFE, FR_TXFF, FR_RXFF, FR_TXFE = 1 << 4, 1 << 5, 1 << 6, 1 << 7
INT_RX, INT_TX, INT_RT = 1 << 4, 1 << 5, 1 << 6
INT_ALL = 0x7FF
LCR_H_FEN = 1 << 4
CR_RESET = 0x300                     # TXE | RXE
CR_LBE = 1 << 7                      # loopback: what is sent is received
IFLS_RESET = 0x12
# The registers that read back as stored, by the attribute that holds them.
_STORED = {UARTLCR_H: "lcr_h", UARTCR: "cr", UARTIBRD: "ibrd", UARTFBRD: "fbrd", UARTILPR: "ilpr",
           UARTIFLS: "ifls", UARTIMSC: "imsc", UARTRIS: "ris", UARTDMACR: "dmacr"}
# The bits each of those holds.
_WIDTH = {"lcr_h": 0xFF, "cr": 0xFFFF, "ibrd": 0xFFFF, "fbrd": 0x3F, "ilpr": 0xFF, "ifls": 0x3F,
          "imsc": INT_ALL, "ris": INT_ALL, "dmacr": 0x7}
# Host input waiting for the guest; beyond this, further input is dropped.
RX_BUFFER_LIMIT = 4096


class Pl011:
    """One UART. ``out`` receives guest output; ``irq(level)`` drives the interrupt line."""

    def __init__(self, out: Callable[[bytes], object] | None, irq: Callable[[bool], None]) -> None:
        self._out = out
        self._irq = LevelLine(irq)
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.lcr_h = 0
        self.cr = CR_RESET
        self.ibrd = self.fbrd = self.ilpr = self.dmacr = 0
        self.ifls = IFLS_RESET
        self.imsc = 0
        self.ris = 0

    def save(self) -> Pl011State:
        from .persist import Pl011State  # only when saving: see persist's docstring
        with self._lock:
            return Pl011State(self.lcr_h, self.cr, self.ibrd, self.fbrd, self.ilpr, self.ifls, self.imsc,
                              self.ris, self.dmacr, bytes(self._rx))

    def restore(self, state: Pl011State) -> None:
        """SavedStateError, the UART unchanged, for registers a guest could not have written;
        the interrupt line is driven to the level the state gives it."""
        from ...persist import check, check_int
        for name, width in _WIDTH.items():
            check_int(getattr(state, name), 0, width, name)
        check(len(state.rx) <= RX_BUFFER_LIMIT, f"rx holds more than {RX_BUFFER_LIMIT} bytes")
        with self._lock:
            for name in _WIDTH:
                setattr(self, name, getattr(state, name))
            self._rx = collections.deque(state.rx)
            level = self._update()
        self._irq.drive(level)

    # --- host side ---
    def enqueue(self, data: bytes) -> None:
        """Bytes typed on the host, for the guest to read."""
        with self._lock:
            self._rx.extend(data[:RX_BUFFER_LIMIT - len(self._rx)])
            if self._rx:
                self.ris |= INT_RX | INT_RT
            level = self._update()
        self._irq.drive(level)

    # --- guest side ---
    def _update(self) -> bool | None:
        """The new level of the line, or None if it does not change (under the lock)."""
        return self._irq.change(bool(self.ris & self.imsc))

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == UARTDR:
                value = self._rx.popleft() if self._rx else 0
                if not self._rx:
                    self.ris &= ~(INT_RX | INT_RT)
                level = self._update()
            else:
                return self._register(offset)
        self._irq.drive(level)
        return value

    def _register(self, offset: int) -> int:
        if offset == UARTFR:
            return FR_TXFE | (FR_RXFE if not self._rx else 0)
        if offset >= PERIPH_ID_BASE:
            index = (offset - PERIPH_ID_BASE) >> 2
            return IDS[index] if index < len(IDS) else 0
        if offset == UARTMIS:
            return self.ris & self.imsc
        name = _STORED.get(offset)
        return getattr(self, name) if name else 0

    def write(self, offset: int, size: int, value: int) -> None:
        out = None
        with self._lock:
            if offset == UARTDR:
                if self.cr & CR_LBE:
                    if len(self._rx) < RX_BUFFER_LIMIT:
                        self._rx.append(value & 0xFF)
                        self.ris |= INT_RX | INT_RT
                else:
                    out = bytes((value & 0xFF,))
                self.ris |= INT_TX
            elif offset == UARTICR:
                self.ris &= ~value
                if self._rx:            # bytes still waiting keep the receive interrupt up
                    self.ris |= INT_RX | INT_RT
            elif offset in _STORED and offset != UARTRIS:       # the raw status is read-only
                name = _STORED[offset]
                setattr(self, name, value & _WIDTH[name])
            level = self._update()
        if out is not None and self._out is not None:
            self._out(out)
        self._irq.drive(level)
