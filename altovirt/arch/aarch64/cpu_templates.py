"""Firecracker's static CPU template for arm64, and a VM's template applied to its vCPUs.

V1N1 shows an Arm Neoverse V1 to the guest as a Neoverse N1 (Firecracker's
``static_cpu_templates/v1n1.rs``), by clearing fields of four ID registers. Writing an ID
register needs a host kernel that lets userspace write them (Linux 6.7 and later);
elsewhere KVM refuses and the start fails, saying so.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...config.model import BitFilter, CpuTemplate, CpuTemplateSpec, RegisterModifier
from ...errors import VmmError
from ...kvm import KvmError, Vcpu

# KVM_REG_ARM64_SYSREG ids (asm/kvm.h) of the ID registers V1N1 narrows.
ID_AA64PFR0_EL1 = 0x603000000013C020
ID_AA64ISAR0_EL1 = 0x603000000013C030
ID_AA64ISAR1_EL1 = 0x603000000013C031
ID_AA64MMFR2_EL1 = 0x603000000013C03A
STATIC = {
    "V1N1": CpuTemplate(reg_modifiers=(
        RegisterModifier(ID_AA64PFR0_EL1, BitFilter(0x000F000F_00000000, 0)),        # SVE, AMU
        RegisterModifier(ID_AA64ISAR0_EL1, BitFilter(0xF0FF0FFF_0000F000, 0x1000)),  # RNDR, SM3/4, SHA3...
        RegisterModifier(ID_AA64ISAR1_EL1, BitFilter(0x00FFF000_00FFF00F, 0x100001)),  # BF16, I8MM, DPB
        RegisterModifier(ID_AA64MMFR2_EL1, BitFilter(0x0000000F_00000000, 0)),       # TTL
    )),
}
KVM_REG_SIZE_SHIFT = 52


def resolve(spec: CpuTemplateSpec) -> CpuTemplate:
    """The template a VM starts with: a custom one as it is, a static one's modifiers."""
    if spec is None:
        return CpuTemplate()
    return spec if isinstance(spec, CpuTemplate) else STATIC[spec]


def apply_registers(vcpus: Sequence[Vcpu], template: CpuTemplate) -> None:
    """Set the registers ``template`` changes, made from the first vCPU's, on every vCPU (after
    KVM_ARM_VCPU_INIT); VmmError if KVM does not have one or will not take the value."""
    try:
        for m in template.reg_modifiers:
            size = 1 << (m.addr >> KVM_REG_SIZE_SHIFT & 0xF)
            old = int.from_bytes(vcpus[0].get_one_reg_bytes(m.addr, size), "little")
            new = m.bitmap.apply(old).to_bytes(size, "little")
            for vcpu in vcpus:
                vcpu.set_one_reg_bytes(m.addr, new)
    except KvmError as e:
        raise VmmError(f"System configuration error: Failed to create guest config: register {m.addr:#x}: "
                       f"{e}") from e
