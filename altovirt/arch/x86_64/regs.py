"""Initial vCPU state for the 64-bit boot protocol and for PVH.

64-bit (boot.rst, "64-bit boot protocol"): long mode with paging, an
identity map covering the kernel, zero page and command line (we map the
first GiB with 2 MiB pages), flat __BOOT_CS/__BOOT_DS segments, RSI = zero
page, interrupts off. PVH (Xen's docs/misc/pvh.pandoc): 32-bit flat protected
mode, paging off, EBX = hvm_start_info.
"""

from __future__ import annotations

import logging
import struct

from ...kvm import KvmError, Vcpu
from ...kvm import structs as S
from ...memory import GuestMemory
from . import layout

log = logging.getLogger(__name__)

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Segment descriptors: (flags, base, limit) packed as in the SDM, vol. 3, 3.4.5.
GDT_64 = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF]
GDT_32 = [0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067]

# Boot MSRs (as Linux and Firecracker expect them at entry).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
}

# LAPIC local vector table (SDM vol. 3, 11.5.1): LINT0 is the 8259's ExtINT, LINT1 NMI.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_boot_msrs(vcpu: Vcpu) -> dict[int, int]:
    """Set BOOT_MSRS; a host (PVM) that refuses some keeps its defaults for those. Returns
    the MSRs set."""
    try:
        vcpu.set_msrs(BOOT_MSRS)
        return BOOT_MSRS
    except KvmError:
        accepted = {}
        for index, value in BOOT_MSRS.items():
            try:
                vcpu.set_msrs({index: value})
                accepted[index] = value
            except KvmError:
                log.debug("host refuses boot MSR %#x; left at its default", index)
        return accepted


def segment_from_gdt(entry: int, index: int) -> S.kvm_segment:
    """The kvm_segment a CPU would load from GDT ``entry`` at ``index``."""
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    return S.kvm_segment(
        base=base, limit=(limit << 12) | 0xFFF if g else limit, selector=index * 8,
        type=(entry >> 40) & 0xF, present=(entry >> 47) & 1, dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1, s=(entry >> 44) & 1, l=(entry >> 53) & 1, g=g,
        avl=(entry >> 52) & 1, unusable=0 if (entry >> 47) & 1 else 1)


def write_boot_tables(mem: GuestMemory, gdt: list[int], paging: bool) -> None:
    """GDT, an empty IDT and (for 64-bit boot) identity page tables for the first GiB."""
    mem.write(layout.BOOT_GDT_START, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write(layout.BOOT_IDT_START, bytes(8))
    if paging:
        mem.write(layout.PML4_START, struct.pack("<Q", layout.PDPTE_START | 0x3))
        mem.write(layout.PDPTE_START, struct.pack("<Q", layout.PDE_START | 0x3))
        mem.write(layout.PDE_START, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


def setup_sregs(vcpu: Vcpu, gdt: list[int], long_mode: bool) -> None:
    sregs = vcpu.get_sregs()
    code, data, tss = (segment_from_gdt(gdt[i], i) for i in (1, 2, 3))
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT_START, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT_START, 7
    if long_mode:
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
        sregs.cr3 = layout.PML4_START
        sregs.cr4 = X86_CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)


def setup_regs(vcpu: Vcpu, entry: int, long_mode: bool, info: int) -> None:
    regs = S.kvm_regs(rip=entry, rflags=0x2)
    if long_mode:
        regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
        regs.rsi = info
    else:
        regs.rbx = info
    vcpu.set_regs(regs)


def setup_fpu(vcpu: Vcpu) -> None:
    # Power-on defaults: x87 control word 0x37F, MXCSR 0x1F80 (all exceptions masked).
    vcpu.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))


def setup_lapic(vcpu: Vcpu) -> None:
    lapic = vcpu.get_lapic()
    regs = memoryview(lapic).cast("B")
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, reg)
        struct.pack_into("<I", regs, reg, (value & ~0x700) | (mode << 8))
    vcpu.set_lapic(lapic)
