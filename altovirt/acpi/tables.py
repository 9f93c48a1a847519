"""ACPI table structures (ACPI 6.4, chapter 5.2) as ctypes, named as in ACPICA's
actbl.h/actbl2.h (which Linux carries in include/acpi/), and the checksums that
make a guest accept them; and, as plain data, what a device hands the FADT
(:class:`PowerRegisters`, :class:`ResetRegister`, the boot flags).
"""

from __future__ import annotations

import ctypes as C
import struct
from dataclasses import dataclass

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64

OEM_ID = b"ALTOVR"
OEM_TABLE_ID = b"ALTOVIRT"
OEM_REVISION = 1
CREATOR_ID = b"ALTV"
CREATOR_REVISION = 1

# Generic Address Structure (5.2.3.2): address space and access size we use.
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# FADT (5.2.9): revision 6 with minor version 4 is ACPI 6.4's.
FADT_REVISION, FADT_MINOR_REVISION = 6, 4
FADT_F_POWER_BUTTON = 1 << 4         # set: no fixed-feature power button (ours is a device)
FADT_F_SLEEP_BUTTON = 1 << 5         # set: no fixed-feature sleep button
FADT_F_RESET_REGISTER = 1 << 10      # RESET_REG is supported
FADT_F_HW_REDUCED = 1 << 20          # HW_REDUCED_ACPI: no PM1/GPE blocks, no SCI, no FACS
# IA-PC boot architecture flags (5.2.9.3).
BOOT_8042 = 1 << 1
BOOT_NO_VGA = 1 << 2
BOOT_NO_MSI = 1 << 3

# MADT (5.2.12).
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0            # dual 8259s are present (KVM's in-kernel PIC)
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_LOCAL_APIC_NMI = 0, 1, 4
MADT_ENABLED = 1 << 0
MADT_ALL_PROCESSORS = 0xFF           # a Local APIC NMI for every processor

RSDP_REVISION = 2                    # ACPI 2.0+: has the XSDT address
XSDT_REVISION = 1
DSDT_REVISION = 2                    # 2 and later: integers are 64 bits wide
MCFG_REVISION = 1                    # PCI Firmware 3.2, 4.1.2


class acpi_table_header(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("signature", C.c_char * 4), ("length", u32), ("revision", u8), ("checksum", u8),
        ("oem_id", C.c_char * 6), ("oem_table_id", C.c_char * 8), ("oem_revision", u32),
        ("asl_compiler_id", C.c_char * 4), ("asl_compiler_revision", u32),
    ]


class acpi_table_rsdp(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("signature", C.c_char * 8), ("checksum", u8), ("oem_id", C.c_char * 6), ("revision", u8),
        ("rsdt_physical_address", u32), ("length", u32), ("xsdt_physical_address", u64),
        ("extended_checksum", u8), ("reserved", u8 * 3),
    ]


class acpi_generic_address(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("space_id", u8), ("bit_width", u8), ("bit_offset", u8), ("access_width", u8),
                ("address", u64)]


class acpi_table_fadt(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("header", acpi_table_header), ("facs", u32), ("dsdt", u32), ("model", u8),
        ("preferred_profile", u8), ("sci_interrupt", u16), ("smi_command", u32),
        ("acpi_enable", u8), ("acpi_disable", u8), ("s4_bios_request", u8), ("pstate_control", u8),
        ("pm1a_event_block", u32), ("pm1b_event_block", u32), ("pm1a_control_block", u32),
        ("pm1b_control_block", u32), ("pm2_control_block", u32), ("pm_timer_block", u32),
        ("gpe0_block", u32), ("gpe1_block", u32), ("pm1_event_length", u8),
        ("pm1_control_length", u8), ("pm2_control_length", u8), ("pm_timer_length", u8),
        ("gpe0_block_length", u8), ("gpe1_block_length", u8), ("gpe1_base", u8), ("cst_control", u8),
        ("c2_latency", u16), ("c3_latency", u16), ("flush_size", u16), ("flush_stride", u16),
        ("duty_offset", u8), ("duty_width", u8), ("day_alarm", u8), ("month_alarm", u8),
        ("century", u8), ("boot_flags", u16), ("reserved", u8), ("flags", u32),
        ("reset_register", acpi_generic_address), ("reset_value", u8), ("arm_boot_flags", u16),
        ("minor_revision", u8), ("Xfacs", u64), ("Xdsdt", u64),
        ("xpm1a_event_block", acpi_generic_address), ("xpm1b_event_block", acpi_generic_address),
        ("xpm1a_control_block", acpi_generic_address), ("xpm1b_control_block", acpi_generic_address),
        ("xpm2_control_block", acpi_generic_address), ("xpm_timer_block", acpi_generic_address),
        ("xgpe0_block", acpi_generic_address), ("xgpe1_block", acpi_generic_address),
        ("sleep_control", acpi_generic_address), ("sleep_status", acpi_generic_address),
        ("hypervisor_id", u64),
    ]


class acpi_table_madt(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("header", acpi_table_header), ("address", u32), ("flags", u32)]


class acpi_madt_local_apic(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("type", u8), ("length", u8), ("processor_id", u8), ("id", u8), ("lapic_flags", u32)]


class acpi_madt_io_apic(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("type", u8), ("length", u8), ("id", u8), ("reserved", u8), ("address", u32),
                ("global_irq_base", u32)]


class acpi_madt_local_apic_nmi(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("type", u8), ("length", u8), ("processor_id", u8), ("inti_flags", u16), ("lint", u8)]


assert C.sizeof(acpi_table_header) == 36
assert C.sizeof(acpi_table_rsdp) == 36
assert C.sizeof(acpi_generic_address) == 12
assert C.sizeof(acpi_table_fadt) == 276
assert C.sizeof(acpi_madt_local_apic) == 8
assert C.sizeof(acpi_madt_io_apic) == 12
assert C.sizeof(acpi_madt_local_apic_nmi) == 6


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero (5.2.5.3, 5.2.6)."""
    return (-sum(data)) & 0xFF


def header(signature: bytes, revision: int) -> acpi_table_header:
    return acpi_table_header(signature=signature, revision=revision, oem_id=OEM_ID,
                             oem_table_id=OEM_TABLE_ID, oem_revision=OEM_REVISION,
                             asl_compiler_id=CREATOR_ID, asl_compiler_revision=CREATOR_REVISION)


def sdt(head: acpi_table_header, body: bytes) -> bytes:
    """A whole System Description Table: ``head`` (its length and checksum filled in) + ``body``."""
    head.length = C.sizeof(head) + len(body)
    head.checksum = 0
    raw = bytes(head) + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def gas_io(port: int, width: int = 8) -> acpi_generic_address:
    return acpi_generic_address(space_id=GAS_SYSTEM_IO, bit_width=width, bit_offset=0,
                                access_width=GAS_ACCESS_BYTE, address=port)


def rsdp(xsdt_addr: int) -> bytes:
    """The Root System Description Pointer (5.2.5.3), pointing at the XSDT only."""
    r = acpi_table_rsdp(signature=b"RSD PTR ", oem_id=OEM_ID, revision=RSDP_REVISION,
                        length=C.sizeof(acpi_table_rsdp), xsdt_physical_address=xsdt_addr)
    r.checksum = checksum(bytes(r)[:20])
    r.extended_checksum = checksum(bytes(r))
    return bytes(r)


def mcfg(ecam: int, first_bus: int, last_bus: int) -> bytes:
    """The PCI Memory Mapped Configuration table (PCI Firmware 3.2, 4.1.2): segment 0's ECAM
    at ``ecam``, for buses ``first_bus`` to ``last_bus``."""
    entry = struct.pack("<QHBBI", ecam, 0, first_bus, last_bus, 0)
    return sdt(header(b"MCFG", MCFG_REVISION), bytes(8) + entry)


@dataclass(frozen=True)
class ResetRegister:
    """Writing ``value`` to I/O ``port`` resets the machine: the FADT's RESET_REG and
    RESET_VALUE (4.8.3.6), or any register that works so (the i8042's command port)."""

    port: int
    value: int


@dataclass(frozen=True)
class PowerRegisters:
    """A hardware-reduced platform's power registers, I/O ports all, as the FADT names them
    (5.2.9): reset (4.8.3.6), sleep control and sleep status (4.8.3.7); and the SLP_TYP
    that the DSDT's ``\\_S5`` object gives for soft off (7.4.2)."""

    reset: ResetRegister
    sleep_control_port: int
    sleep_status_port: int
    s5_sleep_type: int
