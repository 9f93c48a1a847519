"""The machine's state at power-on, captured before the guest first runs and
put back for a system reset.

KVM has no reset ioctl: a reset means setting every piece of state a guest
can change back to what it was, as QEMU's cpu_reset and kvm_arch_reset_vcpu
do. That is each vCPU's registers, FPU/SSE/AVX state (XSAVE), XCR0, local
APIC (with APIC base, in the sregs), pending events, MP state and the MSRs
the guest may have pointed at its memory (kvmclock, async PF, steal time,
PV EOI), and the VM's PICs, IOAPIC and PIT.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kvm import Vcpu, Vm
from ...kvm import structs as S

# KVM_GET_IRQCHIP chip ids (<linux/kvm.h>)
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
# KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst): a guest that set
# them has KVM writing into its memory, which must stop across a reset.
MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04
MSR_KVM_POLL_CONTROL = 0x4B564D05
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
PV_MSRS = (MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME, MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW,
           MSR_KVM_ASYNC_PF_EN, MSR_KVM_STEAL_TIME, MSR_KVM_PV_EOI_EN, MSR_KVM_POLL_CONTROL,
           MSR_KVM_ASYNC_PF_INT)


@dataclass
class VcpuState:
    regs: S.kvm_regs
    sregs: S.kvm_sregs
    xsave: S.kvm_xsave
    xcrs: S.kvm_xcrs
    lapic: S.kvm_lapic_state
    events: S.kvm_vcpu_events
    mp_state: int
    msrs: dict[int, int]


@dataclass
class PowerOnState:
    vcpus: list[VcpuState]
    irqchips: list[S.kvm_irqchip]
    pit: S.kvm_pit_state2


def capture(vm: Vm, vcpus: list[Vcpu], msrs: list[int]) -> PowerOnState:
    """The state of a VM that is built but has not run; ``msrs`` are the boot MSRs
    set (the paravirtual ones are added). MSRs the host does not know are left out."""
    indices = [*msrs, *PV_MSRS]
    return PowerOnState(
        [VcpuState(v.get_regs(), v.get_sregs(), v.get_xsave(), v.get_xcrs(), v.get_lapic(),
                   v.get_vcpu_events(), v.get_mp_state(), v.get_msrs(indices)) for v in vcpus],
        [vm.get_irqchip(c) for c in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)],
        vm.get_pit2())


def restore(vm: Vm, vcpus: list[Vcpu], state: PowerOnState) -> None:
    """Put ``state`` back; every vCPU must be outside KVM_RUN with its I/O completed."""
    for chip in state.irqchips:
        vm.set_irqchip(chip)
    vm.set_pit2(state.pit)
    for v, s in zip(vcpus, state.vcpus, strict=True):
        v.set_sregs(s.sregs)            # first: it carries the APIC base the LAPIC state needs
        v.set_regs(s.regs)
        v.set_xcrs(s.xcrs)
        v.set_xsave(s.xsave)
        v.set_msrs(s.msrs)
        v.set_lapic(s.lapic)
        v.set_vcpu_events(s.events)
        v.set_mp_state(s.mp_state)
