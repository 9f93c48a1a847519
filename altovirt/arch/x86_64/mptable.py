"""The Intel MultiProcessor table (MP Specification 1.4, chapter 4).

Linux finds it by scanning for the floating pointer "_MP_" in the last KiB
of base memory; the configuration table it points to lives in the reserved
BIOS area at 0xF0000, where there is room for 254 processors.
"""

from __future__ import annotations

import struct

from ...memory import GuestMemory
from . import layout

MPF_ADDR = layout.EBDA_START
MPC_ADDR = layout.BIOS_ROM_START
MP_SPEC_REV = 4                     # 1.4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
MP_IRQ_INT, MP_IRQ_NMI, MP_IRQ_EXTINT = 0, 1, 3
MP_IRQPOL_DEFAULT = 0
ISA_IRQS = 16                       # IRQs 0-15 on the IOAPIC's first pins, identity-mapped
IOAPIC_PINS = 24
CPU_SIGNATURE = 0x600               # family 6, as Firecracker reports
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def ioapic_id(cpus: int) -> int:
    """The IOAPIC's id: the first after the processors' (the MADT uses it too)."""
    return cpus


def build(cpus: int) -> tuple[bytes, bytes]:
    """The floating pointer and the configuration table for ``cpus`` processors."""
    ioapic = ioapic_id(cpus)
    entries = []
    for i in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", MP_PROCESSOR, i, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", MP_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    for irq in range(IOAPIC_PINS):
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_IRQ_INT, MP_IRQPOL_DEFAULT, 0, irq,
                                   ioapic, irq))
    # LINT0 <- the 8259 (ExtINT), LINT1 <- NMI, on every local APIC (0xFF).
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQ_EXTINT, MP_IRQPOL_DEFAULT, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQ_NMI, MP_IRQPOL_DEFAULT, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    header = struct.Struct("<4sHBB8s12sIHHIHBB")
    length = header.size + len(body)
    table = header.pack(b"PCMP", length, MP_SPEC_REV, 0, b"ALTOVIRT", b"MICROVM     ", 0, 0,
                        len(entries), layout.APIC_ADDR, 0, 0, 0) + body
    table = table[:7] + bytes([_checksum(table)]) + table[8:]
    mpf = struct.pack("<4sIBBB5x", b"_MP_", MPC_ADDR, 1, MP_SPEC_REV, 0)
    mpf = mpf[:10] + bytes([_checksum(mpf)]) + mpf[11:]
    return mpf, table


def write(mem: GuestMemory, cpus: int) -> None:
    mpf, table = build(cpus)
    mem.write(MPF_ADDR, mpf)
    mem.write(MPC_ADDR, table)
