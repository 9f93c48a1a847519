"""The PCIe root complex: bus 0's functions, their configuration space through ECAM
(PCI Express Base 4.0, 7.2.2) and, on a PC, through ports 0xCF8/0xCFC (PCI 3.0, 3.2.2.3.2),
and where each function's BARs are mapped.

The VMM places every BAR at start in the host bridge's windows, as firmware would, and
maps it while the function's Memory Space bit is set. A driver that moves a BAR moves
its mapping; one that puts it over RAM or another device's range leaves it unmapped
(logged), and the VMM carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from ...acpi import aml, tables
from ..bus import Bus, BusConflict
from .config import (
    BAR0,
    COMMAND,
    COMMAND_MEMORY,
    HEADER_MULTI_FUNCTION,
    HEADER_TYPE,
    NUM_BARS,
    Bar,
    ConfigSpace,
)

log = logging.getLogger(__name__)

ECAM_BUS_SIZE = 1 << 20         # 32 devices x 8 functions x 4 KiB
CONFIG_ADDRESS_PORT = 0xCF8     # CONFIG_ADDRESS, then CONFIG_DATA at 0xCFC..0xCFF
CONFIG_ADDRESS_ENABLE = 1 << 31
PCI_EXPRESS_ROOT_HID, PCI_ROOT_CID, MOTHERBOARD_HID = "PNP0A08", "PNP0A03", "PNP0C02"
# _OSC (ACPI 6.4, 6.2.11; PCI Firmware 3.2, 4.5): the PCI host bridge's UUID, the controls the
# platform grants the OS (native PCIe hot-plug, the PCIe capability structure) and the
# Capabilities Buffer's error bits.
PCI_HOST_BRIDGE_OSC = "33DB4D5B-1FF7-401C-9657-7441C03DD766"
OSC_GRANTED = 0x01 | 0x10
OSC_UNRECOGNIZED_UUID, OSC_UNRECOGNIZED_REVISION, OSC_CAPABILITIES_MASKED = 0x04, 0x08, 0x10
# The host bridge: QEMU's generic PCIe host (Red Hat, Inc., 1b36:0008), class host bridge.
HOST_BRIDGE_IDS = (0x1B36, 0x0008, 0x060000)
SLOTS, FUNCTIONS = 32, 8


def devfn(slot: int, function: int = 0) -> int:
    return slot << 3 | function


class PciFunction:
    """A function on the bus: its configuration space, and what its BARs do (subclasses).
    ``mapped`` is where each BAR is mapped now (None: not at all)."""

    def __init__(self, name: str, config: ConfigSpace) -> None:
        self.name = name
        self.config = config
        self.mapped: dict[int, int | None] = {}
        self.power_on = b""             # the configuration space as the VMM left it at start

    def reset(self) -> None:
        """The function's own state back to power-on (its configuration space is put back
        by the root)."""

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A write into BAR ``index``; nothing by default."""

    def bar_mapped(self, index: int, addr: int | None) -> None:
        """BAR ``index`` is now mapped at ``addr`` (None: unmapped)."""

    def downstream(self) -> dict[int, PciFunction]:
        """A bridge's functions on its secondary bus, by devfn (none for a device)."""
        return {}

    def secondary_bus(self) -> int | None:
        """The bus number behind a bridge, as the guest has set it (None for a device)."""
        return None


class HostBridge(PciFunction):
    def __init__(self) -> None:
        vendor, device, class_code = HOST_BRIDGE_IDS
        super().__init__("host-bridge", ConfigSpace(vendor, device, class_code))


class _BarWindow:
    """A BusDevice for one BAR of one function."""

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function, self.index = function, index

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, offset, size, value)


class PciRoot:
    """Bus 0 of a root complex whose configuration space is at ``ecam`` and whose BARs go on
    ``mmio``, placed in ``window32`` and ``window64`` ((base, size) each), and never over
    ``ram`` ((start, end) ranges); ``intx`` are the GSIs of INTA# to INTD#."""

    def __init__(self, mmio: Bus, ecam: tuple[int, int], window32: tuple[int, int],
                 window64: tuple[int, int], ram: Sequence[tuple[int, int]],
                 intx: tuple[int, int, int, int]) -> None:
        self.mmio = mmio
        self.ecam = ecam
        self.intx = intx
        self.last_bus = ecam[1] // ECAM_BUS_SIZE - 1
        self.functions: dict[int, PciFunction] = {}
        self.windows = {False: window32, True: window64}
        self._next = {False: window32[0], True: window64[0]}
        self._ram = ram
        self._bar_windows: dict[tuple[int, int], _BarWindow] = {}
        self.add(HostBridge(), devfn(0))

    # --- functions ---
    def free_slot(self, claimed: Iterable[int] = ()) -> int:
        """The lowest slot with no function, nor one of ``claimed`` (devfns); ValueError when
        all 31 are taken."""
        taken = {at >> 3 for at in (*self.functions, *claimed)}
        for slot in range(1, SLOTS):
            if slot not in taken:
                return slot
        raise ValueError(f"PCI bus 0 has no free slot ({SLOTS - 1} for devices)")

    def mark_multi_function(self) -> None:
        """Once every function is added: function 0 of a slot with more says so (PCI 3.0,
        6.2.1), or software would look no further. The configuration saw to it that each
        such slot has a function 0."""
        for at in self.functions:
            first = self.functions.get(at & ~7)
            if at & 7 and first is not None:
                first.config.set(HEADER_TYPE, 1, first.config.get(HEADER_TYPE, 1) | HEADER_MULTI_FUNCTION)
                first.power_on = bytes(first.config.data)

    def add(self, function: PciFunction, at: int) -> None:
        """Put ``function`` at ``at`` (devfn), its BARs placed and decoding on."""
        if at in self.functions:
            raise ValueError(f"PCI {at >> 3:02x}.{at & 7}: taken by {self.functions[at].name}")
        for bar in function.config.bars:
            if bar is not None:
                bar.addr = self._place(bar)
                function.config.add_bar(bar)
        if any(function.config.bars):
            function.config.write(COMMAND, 2, function.config.get(COMMAND, 2) | COMMAND_MEMORY)
        function.power_on = bytes(function.config.data)
        self.functions[at] = function
        self._remap(function)

    def all_functions(self) -> list[PciFunction]:
        """Those on bus 0 and those behind its bridges."""
        bus0 = list(self.functions.values())
        return [*bus0, *(d for f in bus0 for d in f.downstream().values())]

    def reset(self) -> None:
        """Every function as at power-on, BARs where the VMM placed them (the machine resets)."""
        for function in self.all_functions():
            function.config.data[:] = function.power_on
            function.reset()
        self.refresh()

    def refresh(self) -> None:
        """Map every function's BARs where its registers say (after a restore put them)."""
        for function in self.all_functions():
            self._remap(function)

    def _place(self, bar: Bar) -> int:
        return self.allocate(bar.mem64, bar.size)

    def allocate(self, mem64: bool, size: int) -> int:
        """``size`` bytes (a power of two), aligned, from the 64-bit window or the 32-bit one;
        ValueError when it is full."""
        base, length = self.windows[mem64]
        addr = (self._next[mem64] + size - 1) & ~(size - 1)
        if addr + size > base + length:
            raise ValueError(f"{size:#x} bytes: the {64 if mem64 else 32}-bit window is full")
        self._next[mem64] = addr + size
        return addr

    def plug(self, port: PciFunction, function: PciFunction, window: int) -> None:
        """Put ``function`` behind ``port`` (its device 0), its BARs placed from ``window`` on
        (the port's prefetchable window) and decoding on; the port tells the guest."""
        for bar in function.config.bars:
            if bar is not None:
                bar.addr = window
                window += bar.size
                function.config.add_bar(bar)
        function.config.write(COMMAND, 2, function.config.get(COMMAND, 2) | COMMAND_MEMORY)
        function.power_on = bytes(function.config.data)
        port.downstream()[0] = function
        self._remap(function)

    def unplugged(self, function: PciFunction) -> None:
        """``function`` has left its slot: its BARs go off the bus."""
        self._remap(function)

    def intx_gsi(self, at: int, pin: int = 1) -> int:
        """The GSI of ``pin`` (1 to 4: INTA# to INTD#) of the function at ``at`` (devfn) on
        bus 0, or of a device 0's INTA# behind the bridge there (which it swizzles to the
        bridge's INTA#, PCI-to-PCI Bridge 1.2, 9.1), as the DSDT's _PRT says."""
        return self.intx[((at >> 3) + pin - 1) % len(self.intx)]

    def requester_id(self, function: object) -> int:
        """``function``'s bus number and devfn as its MSIs carry them (PCI Express Base 4.0,
        2.2.6.2): bus 0, or the secondary bus the guest gave the bridge it is behind."""
        at, child = self.location(function)
        if not child:
            return at
        return (self.functions[at].secondary_bus() or 0) << 8 | (child - 1)

    def location(self, function: object) -> tuple[int, int]:
        """Where ``function`` is, in an order that does not depend on how it got there: (its
        devfn, 0) on bus 0, (the bridge's devfn, 1 + its devfn) behind a bridge."""
        for at, f in self.functions.items():
            if f is function:
                return at, 0
            for child_at, child in f.downstream().items():
                if child is function:
                    return at, 1 + child_at
        raise ValueError(f"{function} is not on the bus")

    def _function(self, bus: int, at: int) -> PciFunction | None:
        if bus == 0:
            return self.functions.get(at)
        for bridge in self.functions.values():
            if bridge.secondary_bus() == bus:
                return bridge.downstream().get(at)
        return None

    def _attached(self, function: PciFunction) -> bool:
        return any(f is function for f in self.all_functions())

    def _remap(self, function: PciFunction) -> None:
        """Map each BAR where the function's registers say, if Memory Space is on."""
        config = function.config
        for bar in config.bars:
            if bar is None:
                continue
            want = config.bar_address(bar) if config.memory_enabled and self._attached(function) else None
            have = function.mapped.get(bar.index)
            if want == have:
                continue
            key = (id(function), bar.index)
            window = self._bar_windows.setdefault(key, _BarWindow(function, bar.index))
            if have is not None:
                self.mmio.remove(have)
            if want is not None and (want == 0 or self._over_ram(want, bar.size)):
                log.warning("%s: BAR%d at %#x overlaps RAM or is unset; left unmapped", function.name,
                            bar.index, want)
                want = None
            if want is not None:
                try:
                    self.mmio.insert(window, want, bar.size)
                except BusConflict:
                    log.warning("%s: BAR%d at %#x overlaps another device; left unmapped", function.name,
                                bar.index, want)
                    want = None
            function.mapped[bar.index] = want
            function.bar_mapped(bar.index, want)

    def mcfg(self) -> bytes:
        """The MCFG table that gives the ECAM (PCI Firmware 3.2, 4.1.2)."""
        return tables.mcfg(self.ecam[0], 0, self.last_bus)

    def acpi_devices(self) -> tuple[bytes, bytes]:
        """The DSDT's host bridge (PCI Firmware 3.2, 4.1.5: its bus numbers, the configuration
        ports and the two BAR windows), and the ECAM reserved as a motherboard resource."""
        (base32, size32), (base64, size64) = self.windows[False], self.windows[True]
        pci0 = aml.device("PCI0", aml.name("_HID", aml.eisa_id(PCI_EXPRESS_ROOT_HID)), _osc(),
                          aml.name("_CID", aml.eisa_id(PCI_ROOT_CID)), aml.name("_SEG", aml.integer(0)),
                          aml.name("_BBN", aml.integer(0)), aml.name("_UID", aml.integer(0)),
                          aml.crs(aml.word_bus_number(0, self.last_bus),
                                  aml.io_port(CONFIG_ADDRESS_PORT, 8),
                                  aml.word_io(0, CONFIG_ADDRESS_PORT), aml.word_io(0xD00, 0x10000 - 0xD00),
                                  aml.dword_memory(base32, size32), aml.qword_memory(base64, size64)),
                          self._prt())
        reserved = aml.device("ECAM", aml.name("_HID", aml.eisa_id(MOTHERBOARD_HID)),
                              aml.name("_UID", aml.integer(1)), aml.crs(aml.memory32_fixed(*self.ecam)))
        return pci0, reserved

    def _prt(self) -> bytes:
        """Name (_PRT, ...): each slot's INTA# to INTD# straight to a GSI, rotated by slot
        (ACPI 6.4, 6.2.13; QEMU's microvm does the same)."""
        n = len(self.intx)
        return aml.name("_PRT", aml.package(*(
            aml.package(aml.integer(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0),
                        aml.integer(self.intx[(slot + pin) % n]))
            for slot in range(SLOTS) for pin in range(4))))

    def _over_ram(self, addr: int, size: int) -> bool:
        return any(addr < end and start < addr + size for start, end in self._ram)

    # --- configuration accesses ---
    def config_read(self, bus: int, at: int, offset: int, size: int) -> int:
        function = self._function(bus, at)
        if function is None:
            return (1 << (8 * size)) - 1        # nobody answers: a master abort reads all ones
        return function.config_read(offset, size)

    def config_write(self, bus: int, at: int, offset: int, size: int, value: int) -> None:
        function = self._function(bus, at)
        if function is None:
            return
        function.config_write(offset, size, value)
        if offset < BAR0 + 4 * NUM_BARS and offset + size > COMMAND:
            self._remap(function)


class Ecam:
    """The root's configuration space in memory: 1 MiB a bus, 4 KiB a function."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def read(self, offset: int, size: int) -> int:
        return self.root.config_read(offset >> 20, offset >> 12 & 0xFF, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.root.config_write(offset >> 20, offset >> 12 & 0xFF, offset & 0xFFF, size, value)


class ConfigPorts:
    """Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (dword), CONFIG_DATA at 0xCFC-0xCFF."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root
        self.address = 0

    def _target(self, offset: int) -> tuple[int, int, int] | None:
        if not self.address & CONFIG_ADDRESS_ENABLE:
            return None
        return self.address >> 16 & 0xFF, self.address >> 8 & 0xFF, (self.address & 0xFC) + offset - 4

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self.address if (offset, size) == (0, 4) else (1 << (8 * size)) - 1
        target = self._target(offset)
        return (1 << (8 * size)) - 1 if target is None else self.root.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if (offset, size) == (0, 4):
                self.address = value & 0x80FFFFFC
            return
        target = self._target(offset)
        if target is not None:
            self.root.config_write(*target, size, value)


def _osc() -> bytes:
    """Method (_OSC, 4): native PCIe hot-plug and the PCIe capability structure are the OS's
    (Linux's pciehp takes the root ports' slots only then); other controls are masked, and
    the error bits say what was not understood, as QEMU's q35 answers."""
    cdw1, cdw3 = aml.name_string("CDW1"), aml.name_string("CDW3")
    return aml.method(
        "_OSC", 4,
        aml.create_dword_field(aml.arg(3), 0, "CDW1"),
        aml.if_(aml.lequal(aml.arg(0), aml.uuid(PCI_HOST_BRIDGE_OSC)),
                aml.create_dword_field(aml.arg(3), 8, "CDW3"),
                aml.store(cdw3, aml.local(0)),
                aml.and_(aml.local(0), aml.integer(OSC_GRANTED), aml.local(0)),
                aml.if_(aml.lnot(aml.lequal(aml.arg(1), aml.integer(1))),
                        aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_REVISION), cdw1)),
                aml.if_(aml.lnot(aml.lequal(cdw3, aml.local(0))),
                        aml.or_(cdw1, aml.integer(OSC_CAPABILITIES_MASKED), cdw1)),
                aml.store(aml.local(0), cdw3)),
        aml.else_(aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_UUID), cdw1)),
        aml.return_(aml.arg(3)))
