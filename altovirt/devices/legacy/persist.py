"""The saved state of the legacy devices (see :mod:`altovirt.persist`).

Apart from the devices, as Firecracker keeps its persist modules, and imported only
when state is saved or restored: a VM that never snapshots does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SerialState:
    ier: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    fifo: bool
    thr_pending: bool
    rx: bytes               # typed on the host, not yet read by the guest


@dataclass(frozen=True)
class I8042State:
    ctr: int
    pending_cmd: int
    out: bytes              # bytes waiting for the guest at port 0x60


@dataclass(frozen=True)
class RtcState:
    index: int
    cmos: bytes             # the time registers are read from the host clock, never stored


@dataclass(frozen=True)
class Pl011State:
    lcr_h: int
    cr: int
    ibrd: int
    fbrd: int
    ilpr: int
    ifls: int
    imsc: int
    ris: int
    dmacr: int
    rx: bytes               # typed on the host, not yet read by the guest


@dataclass(frozen=True)
class Pl031State:
    offset: int             # seconds the guest's clock is ahead of the host's (UTC)
    match: int
    imsc: int


@dataclass(frozen=True)
class Pl061State:
    inputs: int             # the lines as the VMM drives them (the power button)
    data: int
    dir: int
    isense: int
    ibe: int
    iev: int
    ie: int
    ris: int
    afsel: int
