"""The KVM ABI mirrors (altovirt.kvm) against <linux/kvm.h> as gcc sees it."""

from __future__ import annotations

import ctypes as C

import pytest

from altovirt.arch.aarch64 import gic, regs
from altovirt.kvm import ioctls as K
from altovirt.kvm import structs as S
from altovirt.vmm import vcpu

from .cabi import c_mismatches, c_values, check_struct, named_fields, needs_cross_gcc, needs_gcc

KVM_H = ("linux/kvm.h",)

STRUCTS = [
    ("struct kvm_regs", S.kvm_regs, {}),
    ("struct kvm_segment", S.kvm_segment, {}),
    ("struct kvm_dtable", S.kvm_dtable, {}),
    ("struct kvm_sregs", S.kvm_sregs, {}),
    ("struct kvm_fpu", S.kvm_fpu, {}),
    ("struct kvm_msr_entry", S.kvm_msr_entry, {}),
    ("struct kvm_msrs", S.kvm_msrs, {}),
    ("struct kvm_msr_list", S.kvm_msr_list, {}),
    ("struct kvm_cpuid_entry2", S.kvm_cpuid_entry2, {}),
    ("struct kvm_cpuid2", S.kvm_cpuid2, {}),
    ("struct kvm_lapic_state", S.kvm_lapic_state, {}),
    ("struct kvm_xsave", S.kvm_xsave, {}),
    ("struct kvm_xcr", S.kvm_xcr, {}),
    ("struct kvm_xcrs", S.kvm_xcrs, {}),
    ("struct kvm_vcpu_events", S.kvm_vcpu_events, {"triple_fault_pending": "triple_fault"}),
    ("struct kvm_mp_state", S.kvm_mp_state, {}),
    ("struct kvm_userspace_memory_region", S.kvm_userspace_memory_region, {}),
    ("struct kvm_pit_config", S.kvm_pit_config, {}),
    ("struct kvm_pit_channel_state", S.kvm_pit_channel_state, {}),
    ("struct kvm_pit_state2", S.kvm_pit_state2, {}),
    ("struct kvm_irqchip", S.kvm_irqchip, {}),
    ("struct kvm_irqfd", S.kvm_irqfd, {}),
    ("struct kvm_ioeventfd", S.kvm_ioeventfd, {}),
    ("struct kvm_irq_routing_irqchip", S.kvm_irq_routing_irqchip, {}),
    ("struct kvm_irq_routing_msi", S.kvm_irq_routing_msi, {}),
    ("struct kvm_irq_routing_entry", S.kvm_irq_routing_entry, {}),
    ("struct kvm_irq_routing", S.kvm_irq_routing, {}),
    ("struct kvm_debugregs", S.kvm_debugregs, {}),
    ("struct kvm_dirty_log", S.kvm_dirty_log, {"dirty_bitmap": "padding2"}),
    ("struct kvm_clock_data", S.kvm_clock_data, {}),
    # kvm_run's exit data is an anonymous union; ours is named "u".
    ("struct kvm_run", S.kvm_run, {"u": "io"}),
]


@needs_gcc
@pytest.mark.parametrize("c_name, struct, rename", STRUCTS, ids=[s[0].split()[1] for s in STRUCTS])
def test_struct_layout(c_name: str, struct: type, rename: dict[str, str]) -> None:
    check_struct(KVM_H, c_name, struct, rename)


@needs_gcc
def test_kvm_run_exit_unions() -> None:
    exprs = {
        "offsetof(struct kvm_run, io.port)": S.kvm_run.u.offset + S.kvm_run_io.port.offset,
        "offsetof(struct kvm_run, io.data_offset)": S.kvm_run.u.offset + S.kvm_run_io.data_offset.offset,
        "offsetof(struct kvm_run, mmio.len)": S.kvm_run.u.offset + S.kvm_run_mmio.len.offset,
        "offsetof(struct kvm_run, mmio.is_write)": S.kvm_run.u.offset + S.kvm_run_mmio.is_write.offset,
        "offsetof(struct kvm_run, fail_entry.cpu)": S.kvm_run.u.offset + S.kvm_run_fail_entry.cpu.offset,
        "offsetof(struct kvm_run, internal.data)": S.kvm_run.u.offset + S.kvm_run_internal.data.offset,
        "offsetof(struct kvm_run, system_event.ndata)":
            S.kvm_run.u.offset + S.kvm_run_system_event.ndata.offset,
    }
    got = c_values(KVM_H, tuple(exprs))
    assert got == exprs


# The arm64 requests need <asm/kvm.h>'s struct kvm_vcpu_init, which only arm64's header has.
ARM64_ONLY = ("KVM_ARM_VCPU_INIT", "KVM_ARM_PREFERRED_TARGET")
IOCTL_NAMES = sorted(n for n in vars(K) if n.startswith("KVM_") and isinstance(getattr(K, n), int)
                     and n not in ("KVM_API_VERSION", *ARM64_ONLY))


@needs_gcc
def test_ioctl_numbers_and_constants() -> None:
    """Every request number, exit reason, capability and flag equals the header's."""
    got = c_values(KVM_H, tuple(IOCTL_NAMES))
    wrong = {n: (getattr(K, n), got[n]) for n in IOCTL_NAMES if getattr(K, n) != got[n]}
    assert not wrong
    assert len(IOCTL_NAMES) > 60


@needs_gcc
def test_api_version() -> None:
    assert c_values(KVM_H, ("KVM_API_VERSION",))["KVM_API_VERSION"] == K.KVM_API_VERSION


def test_exit_fields_the_vcpu_loop_unpacks() -> None:
    """The vCPU loop reads I/O and MMIO exits with struct formats at offsets taken from the
    ctypes kvm_run (checked against the header above): the formats must agree with it."""
    run = S.kvm_run()
    run.exit_reason = K.KVM_EXIT_IO
    run.u.io = S.kvm_run_io(direction=1, size=2, port=0x3F8, count=3, data_offset=4096)
    raw = bytes(run)
    assert vcpu._EXIT_REASON.unpack_from(raw, vcpu._EXIT_REASON_AT) == (K.KVM_EXIT_IO,)
    assert vcpu._IO.unpack_from(raw, vcpu._EXIT_AT) == (1, 2, 0x3F8, 3, 4096)
    run.u.mmio = S.kvm_run_mmio(phys_addr=0xD0000050, len=4, is_write=1)
    run.u.mmio.data[:] = list(range(1, 9))
    raw = bytes(run)
    assert vcpu._MMIO.unpack_from(raw, vcpu._EXIT_AT) == (0xD0000050, bytes(range(1, 9)), 4, 1)
    assert raw[vcpu._MMIO_DATA_AT:vcpu._MMIO_DATA_AT + 8] == bytes(range(1, 9))


# --- arm64: against arm64's <linux/kvm.h> and <asm/kvm.h>, as the cross compiler sees them ---

ARM64_STRUCTS = [("struct kvm_vcpu_init", S.kvm_vcpu_init), ("struct kvm_one_reg", S.kvm_one_reg),
                 ("struct kvm_reg_list", S.kvm_reg_list), ("struct kvm_create_device", S.kvm_create_device),
                 ("struct kvm_device_attr", S.kvm_device_attr), ("struct kvm_irqfd", S.kvm_irqfd),
                 ("struct kvm_ioeventfd", S.kvm_ioeventfd),
                 ("struct kvm_userspace_memory_region", S.kvm_userspace_memory_region),
                 ("struct kvm_run", S.kvm_run)]


@needs_cross_gcc
def test_arm64_abi() -> None:
    """The structures, requests and constants the arm64 machine uses, with arm64's headers:
    KVM_RUN's exits, the one-reg ids (core registers, MPIDR, the virtual counter), the vGIC's
    attributes and KVM_IRQ_LINE's encoding."""
    expected: dict[str, int] = {}
    for c_name, struct in ARM64_STRUCTS:
        expected[f"sizeof({c_name})"] = C.sizeof(struct)
        for field in named_fields(struct):
            if field not in ("u", "s", "kvm_valid_regs", "kvm_dirty_regs", "cr8", "apic_base", "if_flag"):
                expected[f"offsetof({c_name}, {field})"] = getattr(struct, field).offset
    expected["offsetof(struct kvm_run, mmio.is_write)"] = S.kvm_run.u.offset + S.kvm_run_mmio.is_write.offset
    expected["offsetof(struct kvm_run, system_event.type)"] = S.kvm_run.u.offset
    for name in ("KVM_RUN", "KVM_CREATE_VCPU", "KVM_IRQFD", "KVM_IOEVENTFD", "KVM_SET_USER_MEMORY_REGION",
                 "KVM_GET_DIRTY_LOG", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", *ARM64_ONLY,
                 "KVM_GET_ONE_REG", "KVM_SET_ONE_REG", "KVM_GET_REG_LIST", "KVM_CREATE_DEVICE",
                 "KVM_SET_DEVICE_ATTR", "KVM_GET_DEVICE_ATTR", "KVM_HAS_DEVICE_ATTR", "KVM_IRQ_LINE",
                 "KVM_EXIT_MMIO", "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_ARM_NISV", "KVM_SYSTEM_EVENT_SHUTDOWN",
                 "KVM_SYSTEM_EVENT_RESET", "KVM_CAP_ARM_PSCI_0_2", "KVM_CAP_ONE_REG", "KVM_CAP_DEVICE_CTRL"):
        expected[name] = getattr(K, name)
    core = "KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG"
    expected |= {
        f"{core}(regs.regs[0])": regs.X0, f"{core}(regs.pc)": regs.PC, f"{core}(regs.pstate)": regs.PSTATE,
        "ARM64_SYS_REG(3, 0, 0, 0, 5)": regs.MPIDR_EL1,
        "KVM_REG_ARM_TIMER_CNT": regs.KVM_REG_ARM_TIMER_CNT,
        "KVM_ARM_VCPU_POWER_OFF": regs.KVM_ARM_VCPU_POWER_OFF,
        "KVM_ARM_VCPU_PSCI_0_2": regs.KVM_ARM_VCPU_PSCI_0_2,
        "KVM_DEV_TYPE_ARM_VGIC_V3": gic.KVM_DEV_TYPE_ARM_VGIC_V3,
        "KVM_DEV_ARM_VGIC_GRP_ADDR": gic.KVM_DEV_ARM_VGIC_GRP_ADDR,
        "KVM_DEV_ARM_VGIC_GRP_NR_IRQS": gic.KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        "KVM_DEV_ARM_VGIC_GRP_CTRL": gic.KVM_DEV_ARM_VGIC_GRP_CTRL,
        "KVM_DEV_ARM_VGIC_CTRL_INIT": gic.KVM_DEV_ARM_VGIC_CTRL_INIT,
        "KVM_VGIC_V3_ADDR_TYPE_DIST": gic.KVM_VGIC_V3_ADDR_TYPE_DIST,
        "KVM_VGIC_V3_ADDR_TYPE_REDIST": gic.KVM_VGIC_V3_ADDR_TYPE_REDIST,
        "KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION": gic.KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION,
        "KVM_ARM_IRQ_TYPE_SPI": gic.KVM_ARM_IRQ_TYPE_SPI,
        "KVM_ARM_IRQ_TYPE_SHIFT": gic.KVM_ARM_IRQ_TYPE_SHIFT,
    }
    assert c_mismatches(("linux/kvm.h",), expected) == []
