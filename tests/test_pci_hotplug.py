"""A PCIe root port's slot, driven in-process as Linux's pciehp drives it (the guest-visible
proof is tests/linux/test_pci.py, the QMP side tests/test_pci.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.devices.pci import root_port as rp
from altovirt.devices.pci.root import PciFunction, devfn
from altovirt.persist import SavedStateError

from .test_pci import ECAM, Machine, cfg_read, cfg_write, made


class FakeVector:
    """One eventfd, and the routes it was given."""

    def __init__(self) -> None:
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK)]
        self.routes: list[object] = []

    def route(self, vector: int, message: object) -> None:
        self.routes.append(message)


@pytest.fixture
def port(tmp_path: Path) -> Iterator[tuple[Machine, rp.RootPort, FakeVector, list[PciFunction]]]:
    with made(tmp_path / "disk.img") as m:
        vector, gone = FakeVector(), list[PciFunction]()
        mem32 = m.root.allocate(False, 1 << 20)
        pref = m.root.allocate(True, 1 << 28)
        port = rp.RootPort("rp1", 1, 1, 0, (mem32, 1 << 20), (pref, 1 << 28), vector, gone.append, m.io)
        m.root.add(port, devfn(0x10))
        yield m, port, vector, gone


def test_hot_add_and_attention_button_removal(port: tuple[Machine, rp.RootPort, FakeVector,
                                                          list[PciFunction]]) -> None:
    m, p, vector, gone = port
    at = devfn(0x10)
    assert cfg_read(m, at, 0) == 0x000C1B36 and cfg_read(m, at, 0x0E, 1) & 0x7F == 1
    assert cfg_read(m, at, rp.SECONDARY_BUS, 1) == 1
    exp = p.exp
    assert cfg_read(m, at, exp + rp.EXP_SLTCAP) & rp.SLTCAP_HPC
    # pciehp's probe: MSI on, then hot-plug interrupts for presence, link and the button.
    cfg_write(m, at, p.msi + 4, 4, 0xFEE00000)
    cfg_write(m, at, p.msi + 12, 2, 0x41)
    cfg_write(m, at, p.msi + 2, 2, rp.MSI_FLAGS_ENABLE)
    assert vector.routes[-1] == (0xFEE00000, 0, 0x41)
    cfg_write(m, at, exp + rp.EXP_SLTCTL, 2, rp.SLTCTL_HPIE | rp.SLTCTL_PDCE | rp.SLTCTL_ABPE
              | rp.SLTCTL_DLLSCE)
    function = m.root.functions.pop(devfn(3))           # the machine's disk goes into the slot
    m.root.unplugged(function)
    m.root.plug(p, function, p.window)
    p.plugged()
    assert os.eventfd_read(vector.fds[0]) == 1
    status = cfg_read(m, at, exp + rp.EXP_SLTSTA, 2)
    assert status & rp.SLTSTA_PDS and status & rp.SLTSTA_PDC and status & rp.SLTSTA_DLLSC
    assert cfg_read(m, at, exp + rp.EXP_LNKSTA, 2) & rp.LNKSTA_DLLLA
    assert m.mmio.read(ECAM + (1 << 20), 4) == 0x10421AF4              # bus 1, device 0
    cfg_write(m, at, exp + rp.EXP_SLTSTA, 2, rp.SLTSTA_PDC | rp.SLTSTA_DLLSC)    # the ISR clears them
    assert not cfg_read(m, at, exp + rp.EXP_SLTSTA, 2) & (rp.SLTSTA_PDC | rp.SLTSTA_DLLSC)
    p.request_unplug()
    assert os.eventfd_read(vector.fds[0]) == 1
    assert not gone
    control = cfg_read(m, at, exp + rp.EXP_SLTCTL, 2)
    cfg_write(m, at, exp + rp.EXP_SLTCTL, 2, control | rp.SLTCTL_PCC)      # the guest powers it off,
    assert not gone
    cfg_write(m, at, exp + rp.EXP_SLTCTL, 2, control | rp.SLTCTL_PCC | rp.SLTCTL_PIC_OFF)   # then the LED
    assert gone == [function] and not p.occupied
    assert m.mmio.read(ECAM + (1 << 20), 4) == 0xFFFFFFFF
    assert not cfg_read(m, at, exp + rp.EXP_SLTSTA, 2) & rp.SLTSTA_PDS


def test_reset_and_restore_follow_the_slot(port: tuple[Machine, rp.RootPort, FakeVector,
                                                       list[PciFunction]]) -> None:
    """A machine reset leaves an occupied slot powered, with presence and link up, and what is
    behind it at its power-on place; a saved port restores only into a port whose slot is as
    occupied (its state routes the MSI vector again), and one that is not is refused."""
    m, p, vector, _ = port
    at = devfn(0x10)
    empty = p.save()
    function = m.root.functions.pop(devfn(3))
    m.root.unplugged(function)
    m.root.plug(p, function, p.window)
    p.plugged()
    cfg_write(m, at, p.msi + 4, 4, 0xFEE00000)
    cfg_write(m, at, p.msi + 2, 2, rp.MSI_FLAGS_ENABLE)
    m.root.reset()
    control = cfg_read(m, at, p.exp + rp.EXP_SLTCTL, 2)
    assert not control & rp.SLTCTL_PCC and control & rp.SLTCTL_PIC == rp.SLTCTL_PIC_ON
    assert cfg_read(m, at, p.exp + rp.EXP_SLTSTA, 2) & rp.SLTSTA_PDS
    assert m.mmio.read(ECAM + (1 << 20), 4) == 0x10421AF4 and not cfg_read(m, at, p.msi + 2, 2) & 1
    with pytest.raises(SavedStateError, match="whether its slot holds a device"):
        p.restore(empty)
    cfg_write(m, at, p.msi + 4, 4, 0xFEE00000)          # the reset cleared it
    cfg_write(m, at, p.msi + 2, 2, rp.MSI_FLAGS_ENABLE)
    full = p.save()
    vector.routes.clear()
    p.restore(full)
    assert vector.routes == [(0xFEE00000, 0, 0)]
