"""The ACPI tables of an x86_64 micro-VM: what a distro kernel needs to find
every device and to power off, with no firmware.

Hardware-reduced ACPI (ACPI 6.4, 4.1), as QEMU's microvm and Firecracker use:
- RSDP in the BIOS area (Linux also takes it from the zero page's
  ``acpi_rsdp_addr`` or PVH's ``rsdp_paddr``), pointing at an XSDT;
- FADT with HW_REDUCED_ACPI, the reset register and the sleep control and
  status registers (:mod:`altovirt.devices.legacy.acpi`);
- MADT: a Local APIC per vCPU, the IOAPIC, LINT1 as NMI. ISA IRQs are
  identity-mapped, as the MP table says, so there are no source overrides;
- DSDT: COM1, the i8042, the RTC, each virtio-mmio slot (``LNRO0005``, what
  virtio_mmio.c matches), a processor device per vCPU, the VM Generation ID
  (:mod:`altovirt.devices.legacy.vmgenid`), a Generic Event Device with the
  power button and the generation change, and ``_S5_``.
"""

from __future__ import annotations

import ctypes as C
import struct
from dataclasses import dataclass

from ...acpi import aml
from ...acpi import tables as T
from ...devices.legacy import acpi as regs
from ...devices.legacy.i8042 import COMMAND_PORT as I8042_COMMAND_PORT
from ...devices.legacy.i8042 import DATA_PORT as I8042_DATA_PORT
from ...devices.legacy.i8042 import I8042_IRQ
from ...devices.legacy.rtc import RTC_PORT
from ...devices.legacy.serial import COM1_IRQ, COM1_PORT
from ...memory import GuestMemory
from . import layout, mptable

VIRTIO_MMIO_HID = "LNRO0005"         # drivers/virtio/virtio_mmio.c's ACPI match
GED_HID = "ACPI0013"                 # Generic Event Device (5.6.9)
POWER_BUTTON_HID = "PNP0C0C"         # control-method power button (4.8.2.2.1.2)
PROCESSOR_HID = "ACPI0007"           # processor device (8.4)
NOTIFY_BUTTON_PRESSED = 0x80         # 5.6.6, device-specific notification for buttons
# The VM Generation ID device: our own hardware ID (an ACPI ID needs four hex digits,
# which "VMGENCTR" lacks) and the spec's compatible ID, which ACPICA upper-cases into
# what drivers/virt/vmgenid.c matches (VM_GEN_COUNTER), as for QEMU's.
VMGENID_HID = "ALTV0001"
VMGENID_CID = "VM_Gen_Counter"
NOTIFY_VMGENID_CHANGED = 0x80        # Microsoft's VM Generation ID spec: the ID changed
TABLE_ALIGN = 16


@dataclass(frozen=True)
class MmioSlot:
    """A virtio-mmio transport the DSDT describes."""

    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out for guest RAM at ``layout.ACPI_START``."""

    rsdp_addr: int
    image: bytes                      # everything from ACPI_START, RSDP first
    tables: dict[str, bytes]          # signature ("RSDP", "XSDT", ...) -> the table's bytes


def _crs(*descriptors: bytes) -> bytes:
    return aml.name("_CRS", aml.resource_template(*descriptors))


def dsdt(cpus: int, slots: list[MmioSlot]) -> bytes:
    """The Differentiated System Description Table (5.2.11.1)."""
    devices = [
        aml.device("COM1", aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", aml.integer(1)),
                   _crs(aml.io_port(COM1_PORT, 8), aml.irq_no_flags(COM1_IRQ))),
        aml.device("PS2K", aml.name("_HID", aml.eisa_id("PNP0303")),
                   _crs(aml.io_port(I8042_DATA_PORT, 1), aml.io_port(I8042_COMMAND_PORT, 1),
                        aml.irq_no_flags(I8042_IRQ))),
        aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")), _crs(aml.io_port(RTC_PORT, 2))),
    ]
    devices += [aml.device(f"V{i:03X}", aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
                           aml.name("_UID", aml.integer(i)),
                           _crs(aml.memory32_fixed(s.base, s.size), aml.interrupt(s.irq)))
                for i, s in enumerate(slots)]
    devices += [aml.device(f"C{i:03X}", aml.name("_HID", aml.string(PROCESSOR_HID)),
                           aml.name("_UID", aml.integer(i)))
                for i in range(cpus)]
    devices.append(aml.device("PWRB", aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)),
                              aml.name("_UID", aml.integer(0))))
    devices.append(aml.device(
        "VGEN", aml.name("_HID", aml.string(VMGENID_HID)), aml.name("_CID", aml.string(VMGENID_CID)),
        aml.name("_DDN", aml.string(VMGENID_CID)),
        aml.name("ADDR", aml.package(aml.integer(layout.VMGENID_ADDR & 0xFFFFFFFF),
                                     aml.integer(layout.VMGENID_ADDR >> 32)))))
    # _EVT(GSI): read (and so clear) the event register; a set power-button bit
    # becomes a notification the OS's button driver turns into KEY_POWER, a set
    # VM generation bit one the vmgenid driver reseeds the RNG on.
    devices.append(aml.device(
        "GED", aml.name("_HID", aml.string(GED_HID)), aml.name("_UID", aml.integer(0)),
        _crs(aml.interrupt(regs.GED_IRQ)),
        aml.operation_region("EREG", aml.SYSTEM_IO, regs.GED_EVENT_PORT, 1),
        aml.field("EREG", aml.ACCESS_BYTE, aml.UPDATE_PRESERVE, ("EVTS", 8)),
        aml.method("_EVT", 1,
                   aml.store(aml.name_string("EVTS"), aml.local(0)),
                   aml.if_(aml.lequal(aml.and_(aml.local(0), aml.integer(regs.GED_POWER_BUTTON)),
                                      aml.integer(regs.GED_POWER_BUTTON)),
                           aml.notify("\\_SB.PWRB", NOTIFY_BUTTON_PRESSED)),
                   aml.if_(aml.lequal(aml.and_(aml.local(0), aml.integer(regs.GED_VMGENID)),
                                      aml.integer(regs.GED_VMGENID)),
                           aml.notify("\\_SB.VGEN", NOTIFY_VMGENID_CHANGED)),
                   serialized=True)))
    body = aml.scope("\\_SB", *devices)
    body += aml.name("_S5", aml.package(aml.integer(regs.S5_SLP_TYP), aml.integer(0)))
    return T.sdt(T.header(b"DSDT", T.DSDT_REVISION), body)


def madt(cpus: int) -> bytes:
    """The Multiple APIC Description Table (5.2.12), matching the MP table's processors
    and IOAPIC (same APIC ids)."""
    head = T.acpi_table_madt(header=T.header(b"APIC", T.MADT_REVISION), address=layout.APIC_ADDR,
                             flags=T.MADT_PCAT_COMPAT)
    entries = [bytes(T.acpi_madt_local_apic(type=T.MADT_LOCAL_APIC, length=8, processor_id=i, id=i,
                                            lapic_flags=T.MADT_ENABLED))
               for i in range(cpus)]
    entries.append(bytes(T.acpi_madt_io_apic(type=T.MADT_IO_APIC, length=12,
                                             id=mptable.ioapic_id(cpus), address=layout.IOAPIC_ADDR,
                                             global_irq_base=0)))
    # LINT1 is NMI on every processor (the MP table's second MP_LINTSRC); flags 0: conforming.
    entries.append(bytes(T.acpi_madt_local_apic_nmi(type=T.MADT_LOCAL_APIC_NMI, length=6,
                                                    processor_id=T.MADT_ALL_PROCESSORS, lint=1)))
    body = bytes(head)[C.sizeof(T.acpi_table_header):] + b"".join(entries)
    return T.sdt(head.header, body)


def fadt(dsdt_addr: int) -> bytes:
    """The Fixed ACPI Description Table (5.2.9) of a hardware-reduced platform."""
    f = T.acpi_table_fadt(
        dsdt=dsdt_addr, Xdsdt=dsdt_addr,
        flags=(T.FADT_F_HW_REDUCED | T.FADT_F_RESET_REGISTER | T.FADT_F_POWER_BUTTON
               | T.FADT_F_SLEEP_BUTTON),
        boot_flags=T.BOOT_8042 | T.BOOT_NO_VGA | T.BOOT_NO_MSI,
        reset_register=T.gas_io(regs.RESET_PORT), reset_value=regs.RESET_VALUE,
        minor_revision=T.FADT_MINOR_REVISION,
        sleep_control=T.gas_io(regs.SLEEP_CONTROL_PORT), sleep_status=T.gas_io(regs.SLEEP_STATUS_PORT),
        hypervisor_id=int.from_bytes(b"ALTOVIRT", "little"))
    return T.sdt(T.header(b"FACP", T.FADT_REVISION), bytes(f)[C.sizeof(T.acpi_table_header):])


def _align(n: int) -> int:
    return (n + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


def build(cpus: int, slots: list[MmioSlot]) -> AcpiTables:
    """Every table, placed one after another from layout.ACPI_START."""
    tables = {"DSDT": dsdt(cpus, slots), "APIC": madt(cpus)}
    xsdt_len = C.sizeof(T.acpi_table_header) + 8 * 2           # FADT and MADT
    addr = {"RSDP": layout.ACPI_START}
    addr["XSDT"] = _align(addr["RSDP"] + C.sizeof(T.acpi_table_rsdp))
    addr["FACP"] = _align(addr["XSDT"] + xsdt_len)
    addr["APIC"] = _align(addr["FACP"] + C.sizeof(T.acpi_table_fadt))
    addr["DSDT"] = _align(addr["APIC"] + len(tables["APIC"]))
    end = addr["DSDT"] + len(tables["DSDT"])
    if end > layout.ACPI_START + layout.ACPI_SIZE:
        raise ValueError(f"ACPI tables need {end - layout.ACPI_START} bytes; "
                         f"the area holds {layout.ACPI_SIZE}")
    tables["FACP"] = fadt(addr["DSDT"])
    tables["XSDT"] = T.sdt(T.header(b"XSDT", T.XSDT_REVISION),
                           struct.pack("<QQ", addr["FACP"], addr["APIC"]))
    tables["RSDP"] = T.rsdp(addr["XSDT"])
    image = bytearray(end - layout.ACPI_START)
    for sig, data in tables.items():
        offset = addr[sig] - layout.ACPI_START
        image[offset:offset + len(data)] = data
    return AcpiTables(addr["RSDP"], bytes(image), tables)


def write(mem: GuestMemory, acpi: AcpiTables) -> None:
    mem.write(layout.ACPI_START, acpi.image)
