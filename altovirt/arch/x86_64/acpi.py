"""The ACPI tables of an x86_64 micro-VM: what a distro kernel needs to find
every device and to power off, with no firmware. The devices describe themselves
(each one's ``acpi_device()`` and plain data); this module only assembles.

Hardware-reduced ACPI (ACPI 6.4, 4.1), as QEMU's microvm and Firecracker use:
- RSDP in the BIOS area (Linux also takes it from the zero page's
  ``acpi_rsdp_addr`` or PVH's ``rsdp_paddr``), pointing at an XSDT;
- FADT with HW_REDUCED_ACPI, the reset register and the sleep control and
  status registers it is handed, and the IA-PC boot flags the devices ask for;
- MADT: a Local APIC per vCPU, the IOAPIC, LINT1 as NMI. ISA IRQs are
  identity-mapped, as the MP table says, so there are no source overrides;
- DSDT: a processor device per vCPU, then the Device terms it is handed, in
  their order, in ``\\_SB``, and ``_S5_``;
- and the tables the devices add (a PCIe host bridge's MCFG).
"""

from __future__ import annotations

import ctypes as C
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...acpi import aml
from ...acpi import tables as T
from ...memory import GuestMemory
from . import layout, mptable

PROCESSOR_HID = "ACPI0007"           # processor device (8.4)
TABLE_ALIGN = 16


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out for guest RAM at ``layout.ACPI_START``."""

    rsdp_addr: int
    image: bytes                      # everything from ACPI_START, RSDP first
    tables: dict[str, bytes]          # signature ("RSDP", "XSDT", ...) -> the table's bytes


def dsdt(cpus: int, devices: Sequence[bytes], power: T.PowerRegisters) -> bytes:
    """The Differentiated System Description Table (5.2.11.1): ``\\_SB`` holds the processors,
    then ``devices`` (Device terms), in order; ``\\_S5`` gives the sleep type for soft off."""
    processors = [aml.device(f"C{i:03X}", aml.name("_HID", aml.string(PROCESSOR_HID)),
                             aml.name("_UID", aml.integer(i)))
                  for i in range(cpus)]
    body = aml.scope("\\_SB", *processors, *devices)
    body += aml.name("_S5", aml.package(aml.integer(power.s5_sleep_type), aml.integer(0)))
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


def fadt(dsdt_addr: int, power: T.PowerRegisters, boot_flags: int) -> bytes:
    """The Fixed ACPI Description Table (5.2.9) of a hardware-reduced platform, with the
    ``power`` registers and the devices' IA-PC ``boot_flags`` (5.2.9.3, which say whether
    there is MSI). There is no VGA."""
    f = T.acpi_table_fadt(
        dsdt=dsdt_addr, Xdsdt=dsdt_addr,
        flags=(T.FADT_F_HW_REDUCED | T.FADT_F_RESET_REGISTER | T.FADT_F_POWER_BUTTON
               | T.FADT_F_SLEEP_BUTTON),
        boot_flags=boot_flags | T.BOOT_NO_VGA,
        reset_register=T.gas_io(power.reset.port), reset_value=power.reset.value,
        minor_revision=T.FADT_MINOR_REVISION,
        sleep_control=T.gas_io(power.sleep_control_port), sleep_status=T.gas_io(power.sleep_status_port),
        hypervisor_id=int.from_bytes(b"ALTOVIRT", "little"))
    return T.sdt(T.header(b"FACP", T.FADT_REVISION), bytes(f)[C.sizeof(T.acpi_table_header):])


def _align(n: int) -> int:
    return (n + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


def build(cpus: int, devices: Sequence[bytes], power: T.PowerRegisters, boot_flags: int,
          more: Mapping[str, bytes] = {}) -> AcpiTables:
    """Every table, placed one after another from layout.ACPI_START: ``devices`` are the
    DSDT's Device terms, ``power`` and ``boot_flags`` what the FADT takes from the devices,
    ``more`` the tables they add, by signature. ValueError if they do not fit the area."""
    tables = {"DSDT": dsdt(cpus, devices, power), "APIC": madt(cpus), **more}
    listed = ["FACP", "APIC", *more]                            # what the XSDT points at
    xsdt_len = C.sizeof(T.acpi_table_header) + 8 * len(listed)
    addr = {"RSDP": layout.ACPI_START}
    addr["XSDT"] = _align(addr["RSDP"] + C.sizeof(T.acpi_table_rsdp))
    addr["FACP"] = _align(addr["XSDT"] + xsdt_len)
    end = addr["FACP"] + C.sizeof(T.acpi_table_fadt)
    for sig in ("APIC", "DSDT", *more):
        addr[sig] = _align(end)
        end = addr[sig] + len(tables[sig])
    if end > layout.ACPI_START + layout.ACPI_SIZE:
        raise ValueError(f"ACPI tables need {end - layout.ACPI_START} bytes; "
                         f"the area holds {layout.ACPI_SIZE}")
    tables["FACP"] = fadt(addr["DSDT"], power, boot_flags)
    tables["XSDT"] = T.sdt(T.header(b"XSDT", T.XSDT_REVISION),
                           struct.pack(f"<{len(listed)}Q", *(addr[sig] for sig in listed)))
    tables["RSDP"] = T.rsdp(addr["XSDT"])
    image = bytearray(end - layout.ACPI_START)
    for sig, data in tables.items():
        offset = addr[sig] - layout.ACPI_START
        image[offset:offset + len(data)] = data
    return AcpiTables(addr["RSDP"], bytes(image), tables)


def write(mem: GuestMemory, acpi: AcpiTables) -> None:
    mem.write(layout.ACPI_START, acpi.image)
