"""INTx, for a guest without MSI (Linux's pci=nomsi), driven in-process: a virtio function
holds its INTA# from an event until the driver reads the ISR, a root port its INTB# while an
enabled slot event is pending; each raises it again after the guest's EOI (KVM's resample) only if it
still wants it. The guest-visible proof is tests/linux/test_pci.py's pci=nomsi VM."""

from __future__ import annotations

import os
import time
from pathlib import Path

from altovirt.devices.pci import config as C
from altovirt.devices.pci import root_port as rp
from altovirt.devices.pci.root import PciFunction, devfn
from altovirt.devices.virtio import pci as vpci

from .test_pci import bar0, cfg_read, cfg_write, driver_setup, made, read_sector
from .test_pci_hotplug import FakeVector
from .virtq import DriverQueue


class FakeLine:
    """The two eventfds of an INTx line, KVM's side played by the test: ``raised()`` takes what
    the function wrote to ``fd``, ``eoi()`` signals ``resample_fd`` as KVM does at an EOI."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK)

    def raised(self, wait: float = 0.0) -> bool:
        deadline = time.monotonic() + wait
        while True:
            try:
                return os.eventfd_read(self.fd) > 0
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)

    def eoi(self) -> None:
        os.eventfd_write(self.resample_fd, 1)


def test_a_virtio_function_holds_inta_until_the_isr_is_read(tmp_path: Path) -> None:
    line = FakeLine()
    with made(tmp_path / "disk.img", intx=line) as m:
        at = devfn(3)
        assert cfg_read(m, at, C.INTERRUPT_PIN, 1) == 1
        q = DriverQueue(m.mem, 0x100000, 256)
        driver_setup(m, q, msix=False)
        assert read_sector(m, q, 1) == bytes(range(256)) * 2
        assert line.raised(wait=5)
        line.eoi()                                  # the handler has not read the ISR yet
        assert line.raised(wait=5)
        isr = bar0(m) + vpci.ISR_OFFSET
        assert m.mmio.read(isr, 1) == 1             # used buffers; the read lowers INTA#
        line.eoi()
        assert not line.raised(wait=0.2)
        assert m.mmio.read(isr, 1) == 0
        # INTx Disable in Command: the function keeps its ISR but leaves the pin down.
        cfg_write(m, at, C.COMMAND, 2, C.COMMAND_MEMORY | C.COMMAND_MASTER | C.COMMAND_INTX_DISABLE)
        assert read_sector(m, q, 2) == bytes(range(256)) * 2
        assert not line.raised(wait=0.2)
        assert m.mmio.read(isr, 1) == 1


def test_a_root_port_holds_inta_while_a_slot_event_is_pending(tmp_path: Path) -> None:
    line, vector = FakeLine(), FakeVector()
    with made(tmp_path / "disk.img") as m:
        mem32, pref = m.root.allocate(False, 1 << 20), m.root.allocate(True, 1 << 24)
        gone: list[PciFunction] = []
        port = rp.RootPort("rp1", 1, 1, 0, (mem32, 1 << 20), (pref, 1 << 24), vector, gone.append, m.io, line)
        m.root.add(port, devfn(0x10))
        at, exp = devfn(0x10), port.exp
        assert cfg_read(m, at, C.INTERRUPT_PIN, 1) == 2                # INTB#: apart from its device's
        cfg_write(m, at, exp + rp.EXP_SLTCTL, 2, rp.SLTCTL_HPIE | rp.SLTCTL_ABPE | rp.SLTCTL_PDCE)
        function = m.root.functions.pop(devfn(3))
        m.root.unplugged(function)
        m.root.plug(port, function, port.window)
        port.plugged()
        assert line.raised()
        line.eoi()                                  # still pending: up again
        assert line.raised(wait=5)
        cfg_write(m, at, exp + rp.EXP_SLTSTA, 2, rp.SLTSTA_PDC | rp.SLTSTA_DLLSC)     # pciehp's ISR
        line.eoi()
        assert not line.raised(wait=0.2)
        port.request_unplug()                       # with MSI on, the vector, not the pin
        assert line.raised()
        cfg_write(m, at, exp + rp.EXP_SLTSTA, 2, rp.SLTSTA_ABP)
        cfg_write(m, at, port.msi + 4, 4, 0xFEE00000)
        cfg_write(m, at, port.msi + 2, 2, rp.MSI_FLAGS_ENABLE)
        port.request_unplug()
        assert not line.raised() and os.eventfd_read(vector.fds[0]) == 1
        port.close()
