"""The boot timer: a guest write to port 0x3ff records when boot reached a point.

Like Firecracker's boot-timer device (which uses MMIO), it lets boot time be
measured from inside the guest: the guest writes a marker value, the VMM
logs the value with the milliseconds since the VMM process started.

Port 0x3ff is also COM1's scratch register, so the timer keeps scratch
semantics (a read returns the last value written): an 8250 driver's scratch
test still passes, it just leaves marks in the log.

The guest decides how often it writes, so only the first MAX_MARKS writes are
kept and logged; later ones are counted.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

BOOT_TIMER_PORT = 0x3FF
MAX_MARKS = 64


@functools.cache
def process_start_monotonic() -> float:
    """CLOCK_BOOTTIME of this process's exec, from /proc (clock-tick resolution).
    Cached: the jailer reads it before entering a jail that has no /proc."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class BootMark:
    value: int
    ms: float


class BootTimer:
    def __init__(self) -> None:
        self._start = process_start_monotonic()
        self._origin = "the VMM process started"
        self.marks: list[BootMark] = []
        self.unrecorded = 0             # writes after the first MAX_MARKS
        self._scratch = 0

    def count_from(self, monotonic: float, what: str) -> None:
        """Time marks from ``monotonic`` (a time.monotonic() value, e.g. Firecracker's
        InstanceStart), named ``what`` in the log, instead of the process's start."""
        self._start = time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - monotonic)
        self._origin = what

    def read(self, offset: int, size: int) -> int:
        return self._scratch

    def write(self, offset: int, size: int, value: int) -> None:
        self._scratch = value & 0xFF
        if len(self.marks) == MAX_MARKS:
            if not self.unrecorded:
                log.info("boot timer: %d marks recorded; later ones are only counted", MAX_MARKS)
            self.unrecorded += 1
            return
        ms = (time.clock_gettime(time.CLOCK_BOOTTIME) - self._start) * 1000
        self.marks.append(BootMark(value, ms))
        log.info("boot timer: value=%#x at %.1f ms since %s", value, ms, self._origin)

