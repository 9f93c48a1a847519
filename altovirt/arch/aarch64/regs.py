"""arm64 vCPUs as KVM sees them: register ids (``KVM_REG_*``, arch/arm64/include/uapi/asm/
kvm.h), ``KVM_ARM_VCPU_INIT`` and the boot vCPU's entry (Documentation/arch/arm64/
booting.rst, 4: x0 the device tree's address, x1-x3 zero, MMU off, interrupts masked, EL1).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...config.model import VCPU_INIT_WORDS, VcpuFeatures
from ...kvm import Vcpu
from ...kvm import structs as S

# Register ids (<linux/kvm.h>, arch/arm64/include/uapi/asm/kvm.h).
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def core_reg(offset: int) -> int:
    """The id of the core register at byte ``offset`` of ``struct kvm_regs``."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset // 4


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The id of a system register, by its encoding (Arm ARM C5.3)."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2)


# struct kvm_regs begins with struct user_pt_regs: x0-x30, sp, pc, pstate.
X0, X1, X2, X3 = (core_reg(8 * i) for i in range(4))
PC = core_reg(8 * 32)
PSTATE = core_reg(8 * 33)
MIDR_EL1 = sys_reg(3, 0, 0, 0, 0)
MPIDR_EL1 = sys_reg(3, 0, 0, 0, 5)
# The virtual counter, as KVM names it (asm/kvm.h KVM_REG_ARM_TIMER_CNT: the encoding is not
# CNTVCT_EL0's, by a historical accident KVM keeps).
KVM_REG_ARM_TIMER_CNT = sys_reg(3, 3, 14, 3, 2)

# PSTATE at the kernel's entry: EL1 with SP_EL1 (EL1h), D, A, I and F masked (Arm ARM C5.2.18).
PSR_MODE_EL1H = 0x5
PSR_DAIF = 0x3C0
BOOT_PSTATE = PSR_MODE_EL1H | PSR_DAIF

# KVM_ARM_VCPU_INIT features (asm/kvm.h).
KVM_ARM_VCPU_POWER_OFF = 0       # starts powered off, until PSCI CPU_ON
KVM_ARM_VCPU_PSCI_0_2 = 2        # PSCI 0.2 and later, in KVM

# MPIDR_EL1's affinity fields (Arm ARM D19.2.87): Aff0-Aff2 in bits 0-23, Aff3 in 32-39.
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF


def init_vcpus(vcpus: Sequence[Vcpu], features: Sequence[VcpuFeatures] | None = None) -> None:
    """KVM_ARM_VCPU_INIT every vCPU, at power-on and at each reset: the host's preferred
    target, PSCI, and, but for the boot vCPU (the first), powered off (the guest starts the
    others with PSCI CPU_ON); a CPU template's ``features`` filter those words (None: the
    ones the vCPU was first initialised with, as KVM wants at a reset). Their registers go
    back to their reset values."""
    if not vcpus:
        return
    target = vcpus[0].vm.arm_preferred_target().target
    for vcpu in vcpus:
        if features is not None or not vcpu.arm_features:
            words = [0] * VCPU_INIT_WORDS
            words[0] = 1 << KVM_ARM_VCPU_PSCI_0_2
            for f in features or ():
                words[f.index] = f.bitmap.apply(words[f.index])
            vcpu.arm_features = words
        init = S.kvm_vcpu_init(target=target)
        for i, word in enumerate(vcpu.arm_features):
            init.features[i] = word
        if vcpu.index:
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF
        vcpu.arm_vcpu_init(init)


def mpidrs(vcpus: Sequence[Vcpu]) -> list[int]:
    """The vCPUs' MPIDR affinities, which the device tree names them by."""
    return [vcpu.get_one_reg(MPIDR_EL1) & MPIDR_AFFINITY_MASK for vcpu in vcpus]


def setup_boot_regs(vcpu: Vcpu, entry: int, fdt_addr: int) -> None:
    """The boot vCPU at the kernel's entry, x0 the device tree."""
    vcpu.set_one_reg(PSTATE, BOOT_PSTATE)
    for reg in (X1, X2, X3):
        vcpu.set_one_reg(reg, 0)
    vcpu.set_one_reg(X0, fdt_addr)
    vcpu.set_one_reg(PC, entry)
