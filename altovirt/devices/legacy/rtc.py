"""The CMOS real-time clock at ports 0x70/0x71 (MC146818), showing host UTC.

Time registers are BCD in 24-hour mode (status B = 0x02); the update-in-
progress bit is never set. The memory-size bytes are filled in as a BIOS
would, for firmware and tools that read them. The guest finds the clock in the
DSDT (:meth:`Rtc.acpi_device`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...acpi import aml

if TYPE_CHECKING:
    from .persist import RtcState

RTC_PORT = 0x70              # index; the data register is at 0x71
RTC_HID = "PNP0B00"          # an AT real-time clock: what Linux's rtc-cmos PnP driver matches
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
STATUS_A_DEFAULT = 0x26      # 32.768 kHz time base, 1024 Hz rate
STATUS_B_24H = 0x02
STATUS_D_VRT = 0x80          # valid RAM and time
# Extended memory above 16 MiB in 64 KiB units, and above 4 GiB in 64 KiB units.
MEM_ABOVE_16M_LO, MEM_ABOVE_16M_HI = 0x34, 0x35
MEM_ABOVE_4G = (0x5B, 0x5C, 0x5D)
NMI_DISABLE = 0x80


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


class Rtc:
    """Ports 0x70 (index, offset 0) and 0x71 (data, offset 1)."""

    def __init__(self, low_ram: int, high_ram: int) -> None:
        self.index = 0
        self.cmos = bytearray(128)
        self.cmos[STATUS_A] = STATUS_A_DEFAULT
        self.cmos[STATUS_B] = STATUS_B_24H
        self.cmos[STATUS_D] = STATUS_D_VRT
        above_16m = max(0, low_ram - (16 << 20)) >> 16
        self.cmos[MEM_ABOVE_16M_LO] = above_16m & 0xFF
        self.cmos[MEM_ABOVE_16M_HI] = (above_16m >> 8) & 0xFF
        above_4g = high_ram >> 16
        for i, reg in enumerate(MEM_ABOVE_4G):
            self.cmos[reg] = (above_4g >> (8 * i)) & 0xFF

    def acpi_device(self) -> bytes:
        """The clock in the DSDT: a Device term for ``\\_SB`` with its two ports (ACPI 6.4,
        6.4.2). No IRQ: the clock raises none."""
        return aml.device("RTC", aml.name("_HID", aml.eisa_id(RTC_HID)), aml.crs(aml.io_port(RTC_PORT, 2)))

    def save(self) -> RtcState:
        from .persist import RtcState  # only when saving: see persist's docstring
        return RtcState(self.index, bytes(self.cmos))

    def restore(self, state: RtcState) -> None:
        from ...persist import check, check_int
        check_int(state.index, 0, 0x7F, "index")
        check(len(state.cmos) == len(self.cmos), f"the CMOS must be {len(self.cmos)} bytes")
        self.index, self.cmos = state.index, bytearray(state.cmos)

    def _time_reg(self, reg: int) -> int | None:
        t = time.gmtime()
        values = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour,
                  WEEKDAY: (t.tm_wday + 1) % 7 + 1, DAY: t.tm_mday, MONTH: t.tm_mon,
                  YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        v = values.get(reg)
        return None if v is None else _bcd(v)

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        value = self._time_reg(self.index)
        return self.cmos[self.index] if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F     # bit 7 masks NMIs; nothing to mask here
        elif self.index not in (STATUS_C, STATUS_D) and self._time_reg(self.index) is None:
            self.cmos[self.index] = value & 0xFF
