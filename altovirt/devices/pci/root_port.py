"""A PCIe root port with a hot-plug slot, as QEMU's pcie-root-port (1b36:000c): a type 1
header whose secondary bus holds at most one device (PCI-to-PCI Bridge 1.2, 3.2; PCI Express
Base 4.0, 7.5.3), and the slot registers Linux's pciehp drives (PCI Express Base 4.0, 6.7).

A device comes as presence detect and data link layer state changes; it goes when the
guest turns the slot's power and power indicator off, as QEMU's does: after an attention
button press (device_del; Linux waits 5 s for a second press that would cancel it) or on
its own. The port's events are one MSI vector, or INTB# while MSI is off.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ConfigSpace
from .intx import Intx, IntxLine
from .msix import MsiMessage, MsiVectors
from .root import PciFunction

if TYPE_CHECKING:
    from ...eventloop import EventLoop
    from .persist import RootPortState

CAP_ID_MSI = 0x05
# Type 1 header (PCI-to-PCI Bridge 1.2, 3.2)
PRIMARY_BUS, SECONDARY_BUS, SUBORDINATE_BUS = 0x18, 0x19, 0x1A
MEMORY_BASE, MEMORY_LIMIT = 0x20, 0x22
PREF_BASE, PREF_LIMIT, PREF_BASE_UPPER, PREF_LIMIT_UPPER = 0x24, 0x26, 0x28, 0x2C
BRIDGE_CONTROL = 0x3E
PREF_64BIT = 0x1
# PCI Express Capability (7.5.3), offsets from the capability
EXP_FLAGS, EXP_LNKCAP, EXP_LNKSTA, EXP_SLTCAP, EXP_SLTCTL, EXP_SLTSTA = 0x02, 0x0C, 0x12, 0x14, 0x18, 0x1A
EXP_CAP_LENGTH = 0x3C
EXP_FLAGS_V2, EXP_TYPE_ROOT_PORT, EXP_FLAGS_SLOT = 2, 4 << 4, 1 << 8
LNKCAP_2_5GT, LNKCAP_X1, LNKCAP_DLLLARC = 1, 1 << 4, 1 << 20
LNKSTA_DLLLA = 1 << 13
SLTCAP_ABP, SLTCAP_PCP, SLTCAP_AIP, SLTCAP_PIP, SLTCAP_HPC, SLTCAP_NCCS = 1, 2, 8, 0x10, 0x40, 1 << 18
SLTCTL_ABPE, SLTCTL_PDCE, SLTCTL_HPIE, SLTCTL_PCC, SLTCTL_DLLSCE = 1, 1 << 3, 1 << 5, 1 << 10, 1 << 12
SLTCTL_AIC_OFF, SLTCTL_PIC, SLTCTL_PIC_ON, SLTCTL_PIC_OFF = 0xC0, 0x300, 0x100, 0x300
SLTCTL_WRITABLE = 0x1FFF
SLTSTA_ABP, SLTSTA_PDC, SLTSTA_PDS, SLTSTA_DLLSC = 1, 1 << 3, 1 << 6, 1 << 8
SLTSTA_W1C = 0x011F
# Which Slot Control bit enables the interrupt of which Slot Status event.
EVENT_ENABLES = ((SLTSTA_ABP, SLTCTL_ABPE), (SLTSTA_PDC, SLTCTL_PDCE), (SLTSTA_DLLSC, SLTCTL_DLLSCE))
# MSI capability (PCI 3.0, 6.8.1), 64-bit, one vector
MSI_FLAGS_ENABLE, MSI_FLAGS_64BIT = 1, 1 << 7
ROOT_PORT_IDS = (0x1B36, 0x000C, 0x060400)
# The port's own INTx pin: INTB#, not the INTA# its device's swizzles to (PCI-to-PCI Bridge
# 1.2, 9.1), as some physical root ports do. On a shared line, Linux's pciehp thread removing
# the device would wait for itself: the virtio driver's reset synchronizes the line's handlers.
INTX_PIN = 2


class RootPort(PciFunction):
    """Root port ``name`` whose secondary bus is ``bus``, with Physical Slot Number ``slot``,
    port number ``port`` and the bridge windows ``mem32`` and ``pref64`` ((base, size), 1 MiB
    aligned), its event vector in ``vector`` (one MSI vector) and INTB# on ``intx`` (its
    EOIs seen on ``io``); ``on_powered_off(function)`` is told when the guest turns the slot
    off under a device (hot-unplug done)."""

    def __init__(self, name: str, bus: int, slot: int, port: int, mem32: tuple[int, int],
                 pref64: tuple[int, int], vector: MsiVectors,
                 on_powered_off: Callable[[PciFunction], None], io: EventLoop,
                 intx: IntxLine | None = None) -> None:
        vendor, device, class_code = ROOT_PORT_IDS
        config = ConfigSpace(vendor, device, class_code, header_type=1, interrupt_pin=INTX_PIN if intx else 0)
        super().__init__(name, config)
        self.vector = vector
        self.intx = None if intx is None else Intx(intx, io, self._intx_wanted)
        self.on_powered_off = on_powered_off
        self.children: dict[int, PciFunction] = {}      # devfn on the secondary bus -> function
        self.window = pref64[0]                         # where a plugged device's BARs go
        config.set(PRIMARY_BUS, 1, 0, wmask=0xFF)
        config.set(SECONDARY_BUS, 1, bus, wmask=0xFF)
        config.set(SUBORDINATE_BUS, 1, bus, wmask=0xFF)
        base, size = mem32
        config.set(MEMORY_BASE, 2, base >> 16 & 0xFFF0, wmask=0xFFF0)
        config.set(MEMORY_LIMIT, 2, (base + size - 1) >> 16 & 0xFFF0, wmask=0xFFF0)
        base, size = pref64
        config.set(PREF_BASE, 2, base >> 16 & 0xFFF0 | PREF_64BIT, wmask=0xFFF0)
        config.set(PREF_LIMIT, 2, (base + size - 1) >> 16 & 0xFFF0 | PREF_64BIT, wmask=0xFFF0)
        config.set(PREF_BASE_UPPER, 4, base >> 32, wmask=0xFFFFFFFF)
        config.set(PREF_LIMIT_UPPER, 4, (base + size - 1) >> 32, wmask=0xFFFFFFFF)
        config.set(BRIDGE_CONTROL, 2, 0, wmask=0xFFFF)
        body = bytearray(EXP_CAP_LENGTH - 2)
        struct.pack_into("<H", body, EXP_FLAGS - 2, EXP_FLAGS_V2 | EXP_TYPE_ROOT_PORT | EXP_FLAGS_SLOT)
        struct.pack_into("<I", body, EXP_LNKCAP - 2, LNKCAP_2_5GT | LNKCAP_X1 | LNKCAP_DLLLARC | port << 24)
        struct.pack_into("<H", body, EXP_LNKSTA - 2, LNKCAP_2_5GT | LNKCAP_X1)
        struct.pack_into("<I", body, EXP_SLTCAP - 2, SLTCAP_ABP | SLTCAP_PCP | SLTCAP_AIP | SLTCAP_PIP
                         | SLTCAP_HPC | SLTCAP_NCCS | slot << 19)
        wmask, w1c = bytearray(len(body)), bytearray(len(body))
        struct.pack_into("<H", wmask, EXP_SLTCTL - 2, SLTCTL_WRITABLE)
        struct.pack_into("<H", w1c, EXP_SLTSTA - 2, SLTSTA_W1C)
        self.exp = config.add_capability(0x10, bytes(body), bytes(wmask), bytes(w1c))
        msi = struct.pack("<HIIH", MSI_FLAGS_64BIT, 0, 0, 0)
        self.msi = config.add_capability(CAP_ID_MSI, msi, struct.pack("<HIIH", MSI_FLAGS_ENABLE, 0xFFFFFFFC,
                                                                       0xFFFFFFFF, 0xFFFF))
        self._slot_state()

    def downstream(self) -> dict[int, PciFunction]:
        return self.children

    def secondary_bus(self) -> int | None:
        return self.config.get(SECONDARY_BUS, 1)

    # --- the slot, from the VMM ---
    @property
    def occupied(self) -> bool:
        return bool(self.children)

    def plugged(self, *, hot: bool = True) -> None:
        """A function is in the slot now (the root put it there): presence and the link come
        up, and a hot-plug (not one at start) is an event for the guest."""
        self._link(True)
        if hot:
            self._event(SLTSTA_PDC | SLTSTA_DLLSC)
        else:
            self._slot_state()

    def request_unplug(self) -> None:
        """Press the attention button: the guest lets go of the device and turns the slot off."""
        if not self.children:
            raise ValueError(f"{self.name}: the slot is empty")
        self._event(SLTSTA_ABP)

    def reset(self) -> None:
        """The machine resets: the slot powered as it is occupied, as QEMU's (the root put the
        configuration space back)."""
        self._link(bool(self.children))
        self._slot_state()

    # --- saved state ---
    def save(self) -> RootPortState:
        from .persist import RootPortState  # only when saving
        return RootPortState(bytes(self.config.data))

    def restore(self, state: RootPortState) -> None:
        """Take ``state``, and route the MSI vector as it says. SavedStateError, the port
        unchanged, if it is not of a port like this one (its slot as occupied, too)."""
        from ...persist import check
        check(self.config.fits(state.config), f"{self.name}: the saved root port is another (its IDs, "
                                              "capabilities or whether its slot holds a device differ)")
        self.config.data[:] = state.config
        self._route()

    # --- configuration space, from the guest ---
    def config_write(self, offset: int, size: int, value: int) -> None:
        was_off = self._powered_off()
        if not self.config.write(offset, size, value):
            return
        if offset < self.msi + 14 and offset + size > self.msi:
            self._route()
        if self.children and not was_off and self._powered_off():
            function = self.children.pop(0)
            self._link(False)
            self._event(SLTSTA_PDC)
            self.on_powered_off(function)

    # --- helpers ---
    def _slot_control(self) -> int:
        return self.config.get(self.exp + EXP_SLTCTL, 2)

    def _powered_off(self) -> bool:
        """Power and power indicator both off: the guest is done with the slot's device."""
        control = self._slot_control()
        return bool(control & SLTCTL_PCC) and control & SLTCTL_PIC == SLTCTL_PIC_OFF

    def _slot_state(self) -> None:
        """Slot Control as QEMU's reset leaves it: an occupied slot on, an empty one off, the
        attention indicator off and no event enabled."""
        state = SLTCTL_AIC_OFF | (SLTCTL_PIC_ON if self.children else SLTCTL_PCC | SLTCTL_PIC_OFF)
        self.config.data[self.exp + EXP_SLTCTL:self.exp + EXP_SLTCTL + 2] = state.to_bytes(2, "little")

    def _link(self, up: bool) -> None:
        status = self.config.get(self.exp + EXP_SLTSTA, 2) & ~SLTSTA_PDS | (SLTSTA_PDS if up else 0)
        self.config.data[self.exp + EXP_SLTSTA:self.exp + EXP_SLTSTA + 2] = status.to_bytes(2, "little")
        link = self.config.get(self.exp + EXP_LNKSTA, 2) & ~LNKSTA_DLLLA | (LNKSTA_DLLLA if up else 0)
        self.config.data[self.exp + EXP_LNKSTA:self.exp + EXP_LNKSTA + 2] = link.to_bytes(2, "little")

    def _event(self, bits: int) -> None:
        """Set Slot Status ``bits``; interrupt if one of them is enabled and hot-plug interrupts are."""
        at = self.exp + EXP_SLTSTA
        status = self.config.get(at, 2)
        self.config.data[at:at + 2] = (status | bits).to_bytes(2, "little")
        if not self._interrupting(bits):
            return
        if self._msi_enabled():
            os.eventfd_write(self.vector.fds[0], 1)
        elif self.intx is not None:
            self.intx.update()

    def _interrupting(self, bits: int) -> bool:
        """Whether Slot Status ``bits`` make an interrupt (6.7.3.4)."""
        control = self._slot_control()
        return bool(control & SLTCTL_HPIE) and any(bits & event and control & enable
                                                   for event, enable in EVENT_ENABLES)

    def _msi_enabled(self) -> bool:
        return bool(self.config.get(self.msi + 2, 2) & MSI_FLAGS_ENABLE)

    def _intx_wanted(self) -> bool:
        """INTB# is up while an enabled event is pending, MSI off and INTx on."""
        return not self._msi_enabled() and self.config.intx_enabled and \
            self._interrupting(self.config.get(self.exp + EXP_SLTSTA, 2))

    def _route(self) -> None:
        flags, lo, hi, data = struct.unpack_from("<HIIH", self.config.data, self.msi + 2)
        self.vector.route(0, MsiMessage(lo, hi, data) if flags & MSI_FLAGS_ENABLE else None)

    def close(self) -> None:
        if self.intx is not None:
            self.intx.close()
