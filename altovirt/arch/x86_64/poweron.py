"""The state KVM holds for the machine: each vCPU's, the interrupt controllers', the
PIT's and the clock's, as plain data. Saved before the guest first runs, it is
put back for a system reset; saved later, it is what a snapshot keeps.

KVM has no reset ioctl: a reset means setting every piece of state a guest
can change back to what it was, as QEMU's cpu_reset and kvm_arch_reset_vcpu
do. That is each vCPU's registers, FPU/SSE/AVX state (XSAVE), XCR0, local
APIC (with APIC base, in the sregs), pending events, MP state and the MSRs
the guest may have pointed at its memory (kvmclock, async PF, steal time,
PV EOI), and the VM's PICs, IOAPIC and PIT.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass

from ...kvm import Vcpu, Vm
from ...kvm import structs as S
from ...persist import check, check_bytes, check_int

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


# The largest KVM_MP_STATE_* (<linux/kvm.h>: KVM_MP_STATE_SUSPENDED).
MP_STATE_MAX = 10


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's state as plain data: each KVM structure as its bytes, and its MSRs."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    lapic: bytes
    events: bytes
    mp_state: int
    msr_indices: tuple[int, ...]
    msr_values: tuple[int, ...]


@dataclass(frozen=True)
class VmState:
    """The in-kernel interrupt controllers (PIC master, PIC slave, IOAPIC), the PIT and
    the kvmclock."""

    irqchips: tuple[bytes, ...]
    pit: bytes
    clock: int


@dataclass(frozen=True)
class PowerOnState:
    vcpus: tuple[VcpuState, ...]
    vm: VmState


CHIPS = (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)
_VCPU_STRUCTS = {"regs": S.kvm_regs, "sregs": S.kvm_sregs, "xsave": S.kvm_xsave, "xcrs": S.kvm_xcrs,
                 "lapic": S.kvm_lapic_state, "events": S.kvm_vcpu_events}


def save(vm: Vm, vcpus: list[Vcpu], msrs: list[int]) -> PowerOnState:
    """The VM's and its vCPUs' state (every vCPU outside KVM_RUN); ``msrs`` are the boot
    MSRs set (the paravirtual ones are added). MSRs the host does not know are left out."""
    indices = [*msrs, *PV_MSRS]

    def one(v: Vcpu) -> VcpuState:
        values = v.get_msrs(indices)
        return VcpuState(bytes(v.get_regs()), bytes(v.get_sregs()), bytes(v.get_xsave()), bytes(v.get_xcrs()),
                         bytes(v.get_lapic()), bytes(v.get_vcpu_events()), v.get_mp_state(),
                         tuple(values), tuple(values.values()))

    return PowerOnState(tuple(one(v) for v in vcpus),
                        VmState(tuple(bytes(vm.get_irqchip(c)) for c in CHIPS), bytes(vm.get_pit2()),
                                vm.get_clock().clock))


def _check(vcpus: list[Vcpu], state: PowerOnState) -> None:
    check(len(state.vcpus) == len(vcpus), f"{len(state.vcpus)} vCPUs saved; this VM has {len(vcpus)}")
    for i, s in enumerate(state.vcpus):
        for name, struct in _VCPU_STRUCTS.items():
            check_bytes(getattr(s, name), f"vCPU {i} {name}", C.sizeof(struct))
        check_int(s.mp_state, 0, MP_STATE_MAX, f"vCPU {i} mp_state")
        check(len(s.msr_indices) == len(s.msr_values), f"vCPU {i}: an MSR without its value")
        for index, value in zip(s.msr_indices, s.msr_values, strict=True):
            check_int(index, 0, 0xFFFFFFFF, f"vCPU {i} MSR index")
            check_int(value, 0, (1 << 64) - 1, f"vCPU {i} MSR {index:#x}")
    check(len(state.vm.irqchips) == len(CHIPS), f"{len(CHIPS)} interrupt controllers are saved")
    for chip in state.vm.irqchips:
        check_bytes(chip, "an interrupt controller", C.sizeof(S.kvm_irqchip))
    check_bytes(state.vm.pit, "the PIT", C.sizeof(S.kvm_pit_state2))
    check_int(state.vm.clock, 0, (1 << 64) - 1, "the clock")


def restore(vm: Vm, vcpus: list[Vcpu], state: PowerOnState, *, clock: bool = True) -> None:
    """Put ``state`` back (every vCPU outside KVM_RUN, its I/O completed); a power-on reset
    leaves the kvmclock running (``clock`` False). SavedStateError, with nothing set, for
    state that does not fit this VM."""
    _check(vcpus, state)
    for chip in state.vm.irqchips:
        vm.set_irqchip(S.kvm_irqchip.from_buffer_copy(chip))
    vm.set_pit2(S.kvm_pit_state2.from_buffer_copy(state.vm.pit))
    if clock:
        vm.set_clock(S.kvm_clock_data(clock=state.vm.clock))
    for v, s in zip(vcpus, state.vcpus, strict=True):
        v.set_sregs(S.kvm_sregs.from_buffer_copy(s.sregs))     # first: it holds the APIC base the LAPIC needs
        v.set_regs(S.kvm_regs.from_buffer_copy(s.regs))
        v.set_xcrs(S.kvm_xcrs.from_buffer_copy(s.xcrs))
        v.set_xsave(S.kvm_xsave.from_buffer_copy(s.xsave))
        v.set_msrs(dict(zip(s.msr_indices, s.msr_values, strict=True)))
        v.set_lapic(S.kvm_lapic_state.from_buffer_copy(s.lapic))
        v.set_vcpu_events(S.kvm_vcpu_events.from_buffer_copy(s.events))
        v.set_mp_state(s.mp_state)
