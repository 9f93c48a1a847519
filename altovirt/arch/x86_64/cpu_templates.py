"""Firecracker's static CPU templates for x86_64 (``docs/cpu_templates/cpu-templates.md``), and
the choice of a VM's template at its start.

T2 and C3 make the guest's CPU look like AWS's T2 and C3 instances; T2S narrows T2 so that a
snapshot moves between Skylake and Cascade Lake; T2CL (Intel) and T2A (AMD) give the two
vendors one instruction set. Each is only for the CPUs Firecracker 1.16 allows it on (its
``static_cpu_templates``): elsewhere the start fails, in Firecracker's words. The bits are
Firecracker's; a custom template (``PUT /cpu-config``) with the same modifiers works on any
CPU of the vendor.
"""

from __future__ import annotations

from ...config.model import BitFilter, CpuidModifier, CpuTemplate, CpuTemplateSpec, RegisterModifier
from ...errors import VmmError
from ...kvm import structs as S
from . import cpuid

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"
# CPUID.1 EAX with its family, model and stepping fields only (extended family and model,
# family, model, stepping: what Firecracker's CpuModel compares).
FMS_MASK = 0x0FFF0FFF
SKYLAKE, CASCADE_LAKE, ICE_LAKE, MILAN = 0x00050654, 0x00050657, 0x000606A6, 0x00A00F11
MSR_IA32_ARCH_CAPABILITIES = 0x10A
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1         # sic, <asm/kvm.h>

Row = tuple[int, int, int, str, int, int]   # leaf, subleaf, KVM flags, register, filter, value

# What T2, T2S, T2CL and T2A have in common: the family/model/stepping of T2's CPU, and
# leaves 1, 7 and 0xD narrowed to its features.
_T2_LEAVES: tuple[Row, ...] = (
    (0x1, 0, 0, "eax", 0x0FFF3FFF, 0x000306F2),
    (0x1, 0, 0, "ecx", 0x0004CDFC, 0),
    (0x1, 0, 0, "edx", 0xE8641080, 0x00001080),
    (0x7, 0, 1, "ebx", 0xFFEFDA14, 0x00000200),
    (0x7, 0, 1, "ecx", 0x40415F5E, 0),
    (0x7, 0, 1, "edx", 0x0000011C, 0),
    (0xD, 0, 1, "eax", 0x000002F8, 0),
    (0xD, 1, 1, "eax", 0x0000000E, 0),
)
_T2_EXTENDED: tuple[Row, ...] = (
    (0x80000001, 0, 0, "ecx", 0x20000100, 0),
    (0x80000001, 0, 0, "edx", 0x04000000, 0),
    (0x80000008, 0, 0, "ebx", 0x00000200, 0),
)
_T2CL_EXTENDED: tuple[Row, ...] = (
    (0x80000001, 0, 0, "ecx", 0x200001C0, 0),
    (0x80000001, 0, 0, "edx", 0x07C00000, 0),
    (0x80000008, 0, 0, "ebx", 0x00000200, 0),
)
_T2A_EXTENDED: tuple[Row, ...] = (
    (0x80000001, 0, 0, "ecx", 0x200001C4, 0),
    (0x80000001, 0, 0, "edx", 0x06400000, 0),
    (0x80000008, 0, 0, "ebx", 0x001C0205, 0x001C0004),
)
_C3_LEAVES: tuple[Row, ...] = (
    (0x1, 0, 0, "eax", 0x0FFF3FFF, 0x000306E4),
    (0x1, 0, 0, "ecx", 0x0040DD3C, 0),
    (0x1, 0, 0, "edx", 0xA8641080, 0x00001080),
    (0x7, 0, 1, "ebx", 0xFFAFDD3C, 0),
    (0x7, 0, 1, "ecx", 0x4041481E, 0),
    (0x7, 0, 1, "edx", 0x0000000C, 0),
    (0xD, 0, 1, "eax", 0x000002F8, 0),
    (0xD, 1, 1, "eax", 0x0000000E, 0),
    (0x80000001, 0, 0, "ecx", 0x00000120, 0),
    (0x80000001, 0, 0, "edx", 0x04000000, 0),
)


def _template(rows: tuple[Row, ...], msrs: tuple[tuple[int, int, int], ...] = ()) -> CpuTemplate:
    """The custom template ``rows`` (and MSRs: index, filter, value) spell out."""
    leaves: dict[tuple[int, int, int], list[tuple[str, BitFilter]]] = {}
    for leaf, subleaf, flags, register, filter_, value in rows:
        leaves.setdefault((leaf, subleaf, flags), []).append((register, BitFilter(filter_, value)))
    return CpuTemplate(cpuid_modifiers=tuple(CpuidModifier(*k, tuple(regs)) for k, regs in leaves.items()),
                       msr_modifiers=tuple(RegisterModifier(i, BitFilter(f, v)) for i, f, v in msrs))


# name -> (the vendor, the CPUs (FMS) it is allowed on, its rows, its MSRs)
STATIC: dict[str, tuple[str, tuple[int, ...], tuple[Row, ...], tuple[tuple[int, int, int], ...]]] = {
    "C3": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE, ICE_LAKE), _C3_LEAVES, ()),
    "T2": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE, ICE_LAKE), _T2_LEAVES + _T2_EXTENDED, ()),
    "T2S": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE), _T2_LEAVES + _T2_EXTENDED,
            ((MSR_IA32_ARCH_CAPABILITIES, (1 << 64) - 1, 0x0C080C4C),)),
    "T2CL": (VENDOR_INTEL, (CASCADE_LAKE, ICE_LAKE), _T2_LEAVES + _T2CL_EXTENDED,
             ((MSR_IA32_ARCH_CAPABILITIES, 0xFFFFFFFF_E2F51E00, 0),)),
    "T2A": (VENDOR_AMD, (MILAN,), _T2_LEAVES + _T2A_EXTENDED, ()),
}


class CpuTemplateError(VmmError):
    """The template cannot be used on this host, in Firecracker's words."""


def static_template(name: str) -> CpuTemplate:
    """The modifiers of the static template ``name`` (one of :data:`STATIC`)."""
    _, _, rows, msrs = STATIC[name]
    return _template(rows, msrs)


def resolve(spec: CpuTemplateSpec, supported: list[S.kvm_cpuid_entry2]) -> CpuTemplate:
    """The template a VM starts with: ``spec`` custom as it is, a static one once it is known
    to suit the host's CPU (its vendor and model, from KVM's CPUID: the host's own)."""
    if spec is None:
        return CpuTemplate()
    if isinstance(spec, CpuTemplate):
        return spec
    vendor, models, _, _ = STATIC[spec]
    leaves = {(e.function, e.index): e for e in supported}
    if cpuid.vendor(leaves[(0, 0)]) != vendor:
        raise CpuTemplateError("Failed to get CPU template: CPU vendor mismatched between actual CPU "
                               "and CPU template.")
    if leaves[(1, 0)].eax & FMS_MASK not in models:
        raise CpuTemplateError("Failed to get CPU template: The current CPU model is not permitted to "
                               "apply the CPU template.")
    return static_template(spec)
