"""Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID.

Each vCPU gets its own APIC ID (its index) and a topology of one socket with
``n`` cores of one thread, on both the Intel (leaves 1, 4, 0xB, 0x1F) and AMD
(0x80000008, 0x8000001E) views. The KVM signature leaves (0x40000000...) are
kept as KVM reports them: PVM guests find their hypervisor through them.
"""

from __future__ import annotations

from ...kvm import structs as S

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
# CPUID.0BH/1FH level types (SDM vol. 2A, CPUID)
LEVEL_SMT = 1
LEVEL_CORE = 2


def _bits_for(n: int) -> int:
    """Width of an APIC ID field that numbers ``n`` items."""
    return max(0, (n - 1).bit_length())


def vcpu_cpuid(supported: list[S.kvm_cpuid_entry2], index: int, count: int) -> list[S.kvm_cpuid_entry2]:
    """The CPUID table for vCPU ``index`` of ``count``."""
    out = []
    for src in supported:
        e = S.kvm_cpuid_entry2.from_buffer_copy(src)
        fn = e.function
        if fn == 1:
            e.ebx = (index << 24) | (min(count, 255) << 16) | (e.ebx & 0xFFFF)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.edx = e.edx | CPUID_1_EDX_HTT if count > 1 else e.edx & ~CPUID_1_EDX_HTT
        elif fn == 4 and e.eax & 0x1F:
            # cores per package - 1 in 31:26; each cache shared by one thread (L1/L2) or all (L3)
            level = (e.eax >> 5) & 0x7
            sharing = count - 1 if level >= 3 else 0
            e.eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(count - 1, 63) << 26)
        elif fn in (0xB, 0x1F):
            e.edx = index
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (LEVEL_SMT << 8)
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = _bits_for(count), count, (LEVEL_CORE << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif fn == 0x80000008:
            e.ecx = (e.ecx & ~0xF0FF) | (_bits_for(count) << 12) | (count - 1)
        elif fn == 0x8000001E:
            e.eax, e.ebx, e.ecx = index, index & 0xFF, 0
        out.append(e)
    return out
