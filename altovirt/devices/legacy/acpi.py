"""The registers of hardware-reduced ACPI: sleep control and status, reset, and a
Generic Event Device's event register, on four I/O ports.

A hardware-reduced platform (ACPI 6.4, 4.1) has no PM1 blocks, SCI or GPEs:
the FADT points at a sleep control register for S5 (4.8.3.7) and a reset
register (4.8.3.6), and events reach the OS through a Generic Event Device
(5.6.9), whose interrupt makes the OS run ``_EVT``. Our DSDT's ``_EVT`` reads
the event register (read clears it) and notifies the power button device
when the power-button bit is set, the VM generation ID device when its bit is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

ACPI_PORT_BASE = 0x600
ACPI_PORT_COUNT = 4
SLEEP_CONTROL, SLEEP_STATUS, RESET, GED_EVENT = range(ACPI_PORT_COUNT)   # offsets
SLEEP_CONTROL_PORT = ACPI_PORT_BASE + SLEEP_CONTROL
SLEEP_STATUS_PORT = ACPI_PORT_BASE + SLEEP_STATUS
RESET_PORT = ACPI_PORT_BASE + RESET
GED_EVENT_PORT = ACPI_PORT_BASE + GED_EVENT

RESET_VALUE = 0x0F           # what the FADT tells the OS to write to RESET_PORT
S5_SLP_TYP = 5               # the _S5_ package's value: soft off
SLP_TYP_SHIFT, SLP_TYP_MASK, SLP_EN = 2, 0x1C, 0x20
GED_POWER_BUTTON = 1 << 0    # event register bit: the power button was pressed
GED_VMGENID = 1 << 1         # event register bit: the VM generation ID changed
GED_IRQ = 23                 # the GED's interrupt: the IOAPIC's last pin, used by nothing else


class AcpiRegisters:
    """Ports ACPI_PORT_BASE..+3. ``power_off`` and ``reset`` are called on a vCPU
    thread when the guest asks; ``irq`` raises the GED's interrupt."""

    def __init__(self, power_off: Callable[[], None], reset: Callable[[], None],
                 irq: Callable[[], None]) -> None:
        self._power_off = power_off
        self._reset = reset
        self._irq = irq
        self._events = 0
        self._lock = threading.Lock()

    def press_power_button(self) -> None:
        """Latch the power-button event and interrupt the guest (QMP system_powerdown)."""
        self._raise(GED_POWER_BUTTON)

    def vm_generation_changed(self) -> None:
        """Latch the VM generation event (a restored clone) and interrupt the guest."""
        self._raise(GED_VMGENID)

    def _raise(self, event: int) -> None:
        with self._lock:
            self._events |= event
        self._irq()

    def read(self, offset: int, size: int) -> int:
        if offset == GED_EVENT:
            with self._lock:
                events, self._events = self._events, 0
            return events
        return 0             # sleep status: never a wake event; the others read as 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SLEEP_CONTROL and value & SLP_EN \
                and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP:
            self._power_off()
        elif offset == RESET and value & 0xFF == RESET_VALUE:
            self._reset()
        # Sleep status writes clear WAK_STS, which is never set; other sleep types
        # (S1-S4) are not offered in the DSDT, so writes asking for them do nothing.
