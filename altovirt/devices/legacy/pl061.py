"""An Arm PrimeCell PL061 GPIO controller (PL061 Technical Reference Manual, DDI 0190B) whose
inputs the VMM drives: an Arm board's power button is a line of it (QEMU's virt wires its
line 3 to a ``gpio-keys`` node with KEY_POWER), which :meth:`Pl061.pulse` presses and releases.

Its interrupt output is a level, ``irq(level)``, high while a line whose interrupt is enabled
has one pending; lines are inputs only (what the guest writes to GPIODATA is kept, not driven).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .level import LevelLine

if TYPE_CHECKING:
    from .persist import Pl061State

# Register offsets (TRM 3.2). GPIODATA spans 0x000-0x3FC: address bits 9:2 mask the access.
GPIODATA_END = 0x400
GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOMIS, GPIOIC, GPIOAFSEL = range(0x400, 0x424, 4)
PERIPH_ID_BASE = 0xFE0
# GPIOPeriphID0-3 and GPIOPCellID0-3 (TRM 3.3.11-3.3.12), one byte a register.
IDS = (0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
# The control registers the guest writes and reads back, by the attribute that holds them.
_CONTROL = {GPIODIR: "dir", GPIOIS: "isense", GPIOIBE: "ibe", GPIOIEV: "iev", GPIOIE: "ie",
            GPIOAFSEL: "afsel"}
# What a snapshot keeps, in Pl061State's order: a byte each, a bit a line.
_STATE = ("inputs", "data", "dir", "isense", "ibe", "iev", "ie", "ris", "afsel")


class Pl061:
    """Eight input lines. ``irq(level)`` drives the interrupt line."""

    def __init__(self, irq: Callable[[bool], None]) -> None:
        self._irq = LevelLine(irq)
        self._lock = threading.Lock()
        self.inputs = 0         # the lines' levels, as driven from outside
        self.data = 0           # what the guest wrote (output lines: none are driven)
        self.dir = self.isense = self.ibe = self.iev = self.ie = self.ris = self.afsel = 0

    def save(self) -> Pl061State:
        from .persist import Pl061State  # only when saving: see persist's docstring
        with self._lock:
            return Pl061State(*(getattr(self, name) for name in _STATE))

    def restore(self, state: Pl061State) -> None:
        """SavedStateError, the controller unchanged, for lines or registers past its eight
        lines; the interrupt line is driven to the level the state gives it."""
        from ...persist import check_int
        for name in _STATE:
            check_int(getattr(state, name), 0, 0xFF, name)
        with self._lock:
            for name in _STATE:
                setattr(self, name, getattr(state, name))
            level = self._update()
        self._irq.drive(level)

    # --- host side ---
    def set_line(self, line: int, high: bool) -> None:
        """Drive input ``line`` (0-7) high or low, latching an interrupt as the guest set it up
        (edges: GPIOIS 0, on both with GPIOIBE or on the one GPIOIEV names; levels: GPIOIS 1)."""
        bit = 1 << line
        with self._lock:
            old = self.inputs
            self.inputs = self.inputs | bit if high else self.inputs & ~bit
            if self.isense & bit:
                self._level_lines()
            elif old != self.inputs:
                rising = bool(self.inputs & bit)
                if self.ibe & bit or rising == bool(self.iev & bit):
                    self.ris |= bit
            level = self._update()
        self._irq.drive(level)

    def pulse(self, line: int) -> None:
        """Press and release: the line high, then low again."""
        self.set_line(line, True)
        self.set_line(line, False)

    # --- guest side ---
    def _level_lines(self) -> None:
        """Level-sensitive lines are pending while at the level GPIOIEV names (under the lock)."""
        at_level = (self.inputs & self.iev) | (~self.inputs & ~self.iev & 0xFF)
        self.ris = (self.ris & ~self.isense) | (at_level & self.isense)

    def _update(self) -> bool | None:
        return self._irq.change(bool(self.ris & self.ie))

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset < GPIODATA_END:
                mask = (offset >> 2) & 0xFF
                return ((self.inputs & ~self.dir) | (self.data & self.dir)) & mask
            if offset >= PERIPH_ID_BASE:
                index = (offset - PERIPH_ID_BASE) >> 2
                return IDS[index] if index < len(IDS) else 0
            if offset == GPIOMIS:
                return self.ris & self.ie
            if offset == GPIORIS:
                return self.ris
            name = _CONTROL.get(offset)
            return getattr(self, name) if name else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset < GPIODATA_END:
                mask = (offset >> 2) & 0xFF
                self.data = (self.data & ~mask) | (value & mask)
            elif offset == GPIOIC:
                self.ris &= ~value
            elif offset in _CONTROL:
                setattr(self, _CONTROL[offset], value)
            self._level_lines()
            level = self._update()
        self._irq.drive(level)
