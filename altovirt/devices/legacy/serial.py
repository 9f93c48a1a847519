"""An 8250/16550A UART (National Semiconductor PC16550D data sheet).

Transmit is immediate (THR is always empty again by the next access), so
the transmitter-empty interrupt fires after every byte when enabled; receive
takes bytes from the host through :meth:`Serial.enqueue`. Interrupts are
edges on the serial IRQ line, delivered through an irqfd. The guest finds it as COM1
(:meth:`Serial.acpi_device`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...acpi import aml

if TYPE_CHECKING:
    from .persist import SerialState

# Register offsets from the base port.
DATA, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
FCR = IIR
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO_BITS = 0x01, 0x02, 0x04, 0xC0
FCR_FIFO_ENABLE, FCR_CLEAR_RCVR = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

COM1_PORT, COM1_IRQ = 0x3F8, 4
COM1_HID = "PNP0501"        # a 16550A-compatible COM port: what Linux's 8250_pnp matches
# Host input waiting for the guest; beyond this, further input is dropped.
RX_BUFFER_LIMIT = 4096


class Serial:
    """One UART. ``out`` receives guest output; ``irq`` raises an interrupt edge."""

    def __init__(self, out: Callable[[bytes], object] | None, irq: Callable[[], None]) -> None:
        self._out = out
        self._irq = irq
        self.counters: collections.Counter[str] = collections.Counter()     # Firecracker's "uart" metrics
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0   # 9600 baud, the reset value
        self.fifo = False
        self._thr_pending = False

    def acpi_device(self) -> bytes:
        """This UART as COM1 in the DSDT: a Device term for ``\\_SB`` with its eight ports and
        its ISA IRQ (ACPI 6.4, 6.4.2)."""
        return aml.device("COM1", aml.name("_HID", aml.eisa_id(COM1_HID)), aml.name("_UID", aml.integer(1)),
                          aml.crs(aml.io_port(COM1_PORT, 8), aml.irq_no_flags(COM1_IRQ)))

    # --- saved state ---
    def save(self) -> SerialState:
        from .persist import SerialState  # only when saving: see persist's docstring
        with self._lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm, self.fifo,
                               self._thr_pending, bytes(self._rx))

    def restore(self, state: SerialState) -> None:
        """SavedStateError, the UART unchanged, for registers a guest could not have written."""
        from ...persist import check, check_int
        check_int(state.ier, 0, 0x0F, "ier")
        check_int(state.mcr, 0, 0x1F, "mcr")
        for name in ("lcr", "scr", "dll", "dlm"):
            check_int(getattr(state, name), 0, 0xFF, name)
        check(len(state.rx) <= RX_BUFFER_LIMIT, f"rx holds more than {RX_BUFFER_LIMIT} bytes")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier, state.lcr, state.mcr, state.scr
            self.dll, self.dlm, self.fifo = state.dll, state.dlm, state.fifo
            self._thr_pending = state.thr_pending
            self._rx = collections.deque(state.rx)

    # --- host side ---
    def enqueue(self, data: bytes) -> None:
        """Bytes typed on the host, for the guest to read."""
        with self._lock:
            room = RX_BUFFER_LIMIT - len(self._rx)
            was_empty = not self._rx
            self._rx.extend(data[:room])
            fire = was_empty and self._rx and self.ier & IER_RDI
        if fire:
            self._irq()

    # --- guest side ---
    def _iir(self) -> int:
        fifo = IIR_FIFO_BITS if self.fifo else 0
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI | fifo
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI | fifo
        return IIR_NO_INT | fifo

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return ((m & MCR_RTS) and MSR_CTS) | ((m & MCR_DTR) and MSR_DSR) | \
                ((m & MCR_OUT1) and MSR_RI) | ((m & MCR_OUT2) and MSR_DCD)
        return MSR_DCD | MSR_DSR | MSR_CTS

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                if self.lcr & LCR_DLAB:
                    return self.dll
                value = self._rx.popleft() if self._rx else 0
                self.counters["read_count"] += 1
                return value
            if offset == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == IIR:
                iir = self._iir()
                if iir & 0x0F == IIR_THRI:
                    self._thr_pending = False   # reading IIR acknowledges THRE
                return iir
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            if offset == MSR:
                return self._msr()
            return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        fire = False
        out = None
        with self._lock:
            if offset == DATA:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                else:
                    if self.mcr & MCR_LOOP:
                        self._rx.append(value)
                        fire = bool(self.ier & IER_RDI)
                    else:
                        out = bytes((value,))
                    self._thr_pending = True
                    fire = fire or bool(self.ier & IER_THRI)
            elif offset == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    enabling_thri = value & IER_THRI and not self.ier & IER_THRI
                    self.ier = value & 0x0F
                    if enabling_thri:
                        self._thr_pending = True   # THR is empty: say so at once
                        fire = True
                    fire = fire or bool(value & IER_RDI and self._rx)
            elif offset == FCR:
                self.fifo = bool(value & FCR_FIFO_ENABLE)
                if value & FCR_CLEAR_RCVR:
                    self._rx.clear()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
        if out is not None and self._out is not None:
            self.counters["write_count"] += len(out)
            self._out(out)
        if fire:
            self._irq()
