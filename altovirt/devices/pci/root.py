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
    ``ram`` ((start, end) ranges)."""

    def __init__(self, mmio: Bus, ecam: tuple[int, int], window32: tuple[int, int],
                 window64: tuple[int, int], ram: Sequence[tuple[int, int]]) -> None:
        self.mmio = mmio
        self.ecam = ecam
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

    def reset(self) -> None:
        """Every function as at power-on, BARs where the VMM placed them (the machine resets)."""
        for function in self.functions.values():
            function.config.data[:] = function.power_on
            function.reset()
        self.refresh()

    def refresh(self) -> None:
        """Map every function's BARs where its registers say (after a restore put them)."""
        for function in self.functions.values():
            self._remap(function)

    def _place(self, bar: Bar) -> int:
        base, size = self.windows[bar.mem64]
        addr = (self._next[bar.mem64] + bar.size - 1) & ~(bar.size - 1)
        if addr + bar.size > base + size:
            bits = 64 if bar.mem64 else 32
            raise ValueError(f"BAR of {bar.size:#x} bytes: the {bits}-bit window is full")
        self._next[bar.mem64] = addr + bar.size
        return addr

    def _remap(self, function: PciFunction) -> None:
        """Map each BAR where the function's registers say, if Memory Space is on."""
        config = function.config
        for bar in config.bars:
            if bar is None:
                continue
            want = config.bar_address(bar) if config.memory_enabled and function in self.functions.values() \
                else None
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
        pci0 = aml.device("PCI0", aml.name("_HID", aml.eisa_id(PCI_EXPRESS_ROOT_HID)),
                          aml.name("_CID", aml.eisa_id(PCI_ROOT_CID)), aml.name("_SEG", aml.integer(0)),
                          aml.name("_BBN", aml.integer(0)), aml.name("_UID", aml.integer(0)),
                          aml.crs(aml.word_bus_number(0, self.last_bus),
                                  aml.io_port(CONFIG_ADDRESS_PORT, 8),
                                  aml.word_io(0, CONFIG_ADDRESS_PORT), aml.word_io(0xD00, 0x10000 - 0xD00),
                                  aml.dword_memory(base32, size32), aml.qword_memory(base64, size64)))
        reserved = aml.device("ECAM", aml.name("_HID", aml.eisa_id(MOTHERBOARD_HID)),
                              aml.name("_UID", aml.integer(1)), aml.crs(aml.memory32_fixed(*self.ecam)))
        return pci0, reserved

    def _over_ram(self, addr: int, size: int) -> bool:
        return any(addr < end and start < addr + size for start, end in self._ram)

    # --- configuration accesses ---
    def config_read(self, bus: int, at: int, offset: int, size: int) -> int:
        function = self.functions.get(at) if bus == 0 else None
        if function is None:
            return (1 << (8 * size)) - 1        # nobody answers: a master abort reads all ones
        return function.config_read(offset, size)

    def config_write(self, bus: int, at: int, offset: int, size: int, value: int) -> None:
        function = self.functions.get(at) if bus == 0 else None
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
