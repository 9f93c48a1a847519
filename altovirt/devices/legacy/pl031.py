"""An Arm PrimeCell PL031 real-time clock (PL031 Technical Reference Manual, DDI 0224C),
counting seconds of host UTC.

The counter reads the host's time plus an offset the guest sets by writing the load
register; the match interrupt is never raised (Linux uses it only for alarms, which a
micro-VM does not wake from).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .persist import Pl031State

# Register offsets (TRM 3.2).
RTCDR, RTCMR, RTCLR, RTCCR, RTCIMSC, RTCRIS, RTCMIS, RTCICR = range(0, 0x20, 4)
PERIPH_ID_BASE = 0xFE0
# RTCPeriphID0-3 and RTCPCellID0-3 (TRM 3.3.10-3.3.11), one byte a register.
IDS = (0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)


class Pl031:
    """The clock's 4 KiB of registers."""

    def __init__(self) -> None:
        self.offset = 0             # seconds the guest's clock is ahead of the host's
        self.match = 0
        self.imsc = 0

    def save(self) -> Pl031State:
        from .persist import Pl031State  # only when saving: see persist's docstring
        return Pl031State(self.offset, self.match, self.imsc)

    def restore(self, state: Pl031State) -> None:
        """SavedStateError, the clock unchanged, for state a guest could not have set. The
        clock keeps its distance from UTC: it has gone on while the VM was saved."""
        from ...persist import check_int
        check_int(state.offset, -(1 << 32), 1 << 32, "offset")
        check_int(state.match, 0, 0xFFFFFFFF, "match")
        check_int(state.imsc, 0, 1, "imsc")
        self.offset, self.match, self.imsc = state.offset, state.match, state.imsc

    def _now(self) -> int:
        return (int(time.time()) + self.offset) & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> int:
        if offset == RTCDR:
            return self._now()
        if offset == RTCMR:
            return self.match
        if offset == RTCLR:
            return self._now()
        if offset == RTCCR:
            return 1                # the clock always runs
        if offset == RTCIMSC:
            return self.imsc
        if offset >= PERIPH_ID_BASE:
            index = (offset - PERIPH_ID_BASE) >> 2
            return IDS[index] if index < len(IDS) else 0
        return 0                    # RIS, MIS: no interrupt is ever raised

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == RTCLR:
            self.offset = value - int(time.time())
        elif offset == RTCMR:
            self.match = value
        elif offset == RTCIMSC:
            self.imsc = value & 1
