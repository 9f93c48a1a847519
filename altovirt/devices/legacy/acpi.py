"""The registers of hardware-reduced ACPI: sleep control and status, reset, and a
Generic Event Device's event register, on four I/O ports.

A hardware-reduced platform (ACPI 6.4, 4.1) has no PM1 blocks, SCI or GPEs:
the FADT points at a sleep control register for S5 (4.8.3.7) and a reset
register (4.8.3.6), and events reach the OS through a Generic Event Device
(5.6.9), whose interrupt makes the OS run ``_EVT``. The GED's ``_EVT``
(:meth:`AcpiRegisters.acpi_device`) reads the event register (read clears it)
and notifies the power button device when the power-button bit is set, the VM
generation ID device when its bit is. The FADT takes the registers from
:attr:`AcpiRegisters.power_registers`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...acpi import aml
from ...acpi.tables import PowerRegisters, ResetRegister
from .vmgenid import NOTIFY_VMGENID_CHANGED, VMGENID_PATH

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
GED_HID = "ACPI0013"         # Generic Event Device (5.6.9)
POWER_BUTTON_HID = "PNP0C0C"  # control-method power button (4.8.2.2.1.2)
NOTIFY_BUTTON_PRESSED = 0x80  # 5.6.6, the device-specific notification for buttons


class AcpiRegisters:
    """Ports ACPI_PORT_BASE..+3. ``power_off`` and ``reset`` are called on a vCPU
    thread when the guest asks; ``irq`` raises the GED's interrupt."""

    power_registers = PowerRegisters(ResetRegister(RESET_PORT, RESET_VALUE), SLEEP_CONTROL_PORT,
                                     SLEEP_STATUS_PORT, S5_SLP_TYP)

    def __init__(self, power_off: Callable[[], None], reset: Callable[[], None],
                 irq: Callable[[], None]) -> None:
        self._power_off = power_off
        self._reset = reset
        self._irq = irq
        self._events = 0
        self._lock = threading.Lock()

    def acpi_device(self) -> bytes:
        """The power button and the GED in the DSDT: two Device terms for ``\\_SB``. The GED's
        ``_EVT(GSI)`` reads (and so clears) the event register: a set power-button bit becomes
        a notification that the OS's button driver turns into KEY_POWER, a set VM generation
        bit one that Linux's vmgenid driver reseeds its RNG on. It notifies ``\\_SB.PWRB`` and
        VMGENID_PATH, so it goes after both in the DSDT."""
        def on(bit: int, path: str, value: int) -> bytes:
            return aml.if_(aml.lequal(aml.and_(aml.local(0), aml.integer(bit)), aml.integer(bit)),
                           aml.notify(path, value))

        power_button = aml.device("PWRB", aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)),
                                  aml.name("_UID", aml.integer(0)))
        ged = aml.device(
            "GED", aml.name("_HID", aml.string(GED_HID)), aml.name("_UID", aml.integer(0)),
            aml.crs(aml.interrupt(GED_IRQ)),
            aml.operation_region("EREG", aml.SYSTEM_IO, GED_EVENT_PORT, 1),
            aml.field("EREG", aml.ACCESS_BYTE, aml.UPDATE_PRESERVE, ("EVTS", 8)),
            aml.method("_EVT", 1, aml.store(aml.name_string("EVTS"), aml.local(0)),
                       on(GED_POWER_BUTTON, "\\_SB.PWRB", NOTIFY_BUTTON_PRESSED),
                       on(GED_VMGENID, VMGENID_PATH, NOTIFY_VMGENID_CHANGED), serialized=True))
        return power_button + ged

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
