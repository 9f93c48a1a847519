"""Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID, and the host CPU as a snapshot records it.

Each vCPU gets its own APIC ID (its index) and a topology of one socket with
``n`` cores of one thread, on both the Intel (leaves 1, 4, 0xB, 0x1F) and AMD
(0x80000008, 0x8000001E) views. The KVM signature leaves (0x40000000...) are
kept as KVM reports them: PVM guests find their hypervisor through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...config.model import CpuTemplate
from ...errors import VmmError
from ...kvm import Kvm, KvmError, Vcpu
from ...kvm import structs as S
from ...persist import SavedStateError

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
# CPUID.0BH/1FH level types (SDM vol. 2A, CPUID)
LEVEL_SMT = 1
LEVEL_CORE = 2
# CPUID (leaf, subleaf) -> the registers whose bits are features a guest may have been given.
FEATURE_LEAVES = {(1, 0): ("ecx", "edx"), (7, 0): ("ebx", "ecx", "edx"), (0xD, 0): ("eax", "edx"),
                  (0x80000001, 0): ("ecx", "edx")}


def _bits_for(n: int) -> int:
    """Width of an APIC ID field that numbers ``n`` items."""
    return max(0, (n - 1).bit_length())


def apply_template(supported: list[S.kvm_cpuid_entry2], template: CpuTemplate) -> list[S.kvm_cpuid_entry2]:
    """KVM's CPUID with ``template``'s modifiers applied (before each vCPU's own topology, as
    Firecracker applies them); VmmError, in Firecracker's words, for a leaf KVM does not have."""
    if not template.cpuid_modifiers:
        return supported
    out = [S.kvm_cpuid_entry2.from_buffer_copy(e) for e in supported]
    leaves = {(e.function, e.index): e for e in out}
    for m in template.cpuid_modifiers:
        entry = leaves.get((m.leaf, m.subleaf))
        if entry is None:
            raise VmmError(f"System configuration error: Failed to create guest config: Template changes a "
                           f"CPUID entry not supported by KVM: Leaf: {m.leaf:x}, Subleaf: {m.subleaf:x}")
        entry.flags = m.flags
        for register, bits in m.registers:
            setattr(entry, register, bits.apply(getattr(entry, register)))
    return out


def set_template_msrs(vcpus: Sequence[Vcpu], template: CpuTemplate) -> dict[int, int]:
    """Set the MSRs ``template`` changes, made from the first vCPU's, on every vCPU; returns
    them. VmmError, in Firecracker's words, for one KVM does not have or will not take."""
    where = "System configuration error: Failed to create guest config"
    try:
        have = vcpus[0].get_msrs([m.addr for m in template.msr_modifiers])
        out = {}
        for m in template.msr_modifiers:
            if m.addr not in have:
                raise VmmError(f"{where}: Template changes an MSR entry not supported by KVM: "
                               f"Register Address: {m.addr:x}")
            out[m.addr] = m.bitmap.apply(have[m.addr])
        for vcpu in vcpus:
            vcpu.set_msrs(out)
    except KvmError as e:
        raise VmmError(f"{where}: KVM vcpu ioctl failed: {e}") from e
    return out


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


def vendor(leaf_0: S.kvm_cpuid_entry2) -> str:
    """The CPU's vendor string, as CPUID leaf 0 spells it in EBX, EDX, ECX ("AuthenticAMD")."""
    return b"".join(r.to_bytes(4, "little") for r in (leaf_0.ebx, leaf_0.edx, leaf_0.ecx)).decode(
        errors="replace")


def host_cpu(kvm: Kvm, vcpu: Vcpu, template: CpuTemplate) -> dict[str, Any]:
    """The host CPU as a snapshot's header records it: vendor and the feature bits KVM offers
    the guest through ``template`` (so a guest whose template hid a feature can move to a host
    without it)."""
    leaves = {(e.function, e.index): e for e in apply_template(kvm.supported_cpuid(), template)}
    features = {f"{leaf:#x}.{sub}": [getattr(leaves[(leaf, sub)], r) if (leaf, sub) in leaves else 0
                                     for r in regs]
                for (leaf, sub), regs in FEATURE_LEAVES.items()}
    return {"vendor": vendor(leaves[(0, 0)]), "features": features}


def check_cpu(saved: object, here: dict[str, Any]) -> None:
    """SavedStateError unless a guest saved on the CPU ``saved`` describes can run on ``here``:
    the same vendor, and every feature it may have used."""
    if not isinstance(saved, dict) or not isinstance(saved.get("features"), dict):
        raise SavedStateError("the host CPU is not recorded")
    if saved.get("vendor") != here["vendor"]:
        raise SavedStateError(f"saved on a {saved.get('vendor')} CPU; this host's is {here['vendor']}")
    for leaf, regs in here["features"].items():
        for name, had, has in zip(FEATURE_LEAVES[_leaf(leaf)], saved["features"].get(leaf, []), regs,
                                  strict=False):
            if not isinstance(had, int):
                raise SavedStateError(f"CPUID {leaf} {name} must be an integer")
            if had & ~has:
                raise SavedStateError(f"this host's CPU lacks features the guest may use "
                                      f"(CPUID {leaf} {name} bits {had & ~has:#x})")


def _leaf(key: str) -> tuple[int, int]:
    leaf, sub = key.split(".")
    return int(leaf, 16), int(sub)
