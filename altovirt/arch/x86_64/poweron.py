"""The state KVM holds for the machine: each vCPU's, the interrupt controllers', the
PIT's and the clock's, as plain data. Saved before the guest first runs, it is
put back for a system reset; saved later, with every MSR KVM lists
(:func:`snapshot_msrs`), it is what a snapshot keeps.

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

from ...kvm import Kvm, KvmError, Vcpu, Vm
from ...kvm import structs as S
from ...persist import SavedStateError, check, check_bytes, check_int

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
    """One vCPU's state as plain data: each KVM structure as its bytes, its MSRs, its CPUID
    table (``kvm_cpuid_entry2`` after another) and its TSC frequency."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    lapic: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    msr_indices: tuple[int, ...]
    msr_values: tuple[int, ...]
    cpuid: bytes
    tsc_khz: int


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
                 "lapic": S.kvm_lapic_state, "events": S.kvm_vcpu_events, "debugregs": S.kvm_debugregs}
_CPUID_ENTRY = C.sizeof(S.kvm_cpuid_entry2)
MAX_CPUID_ENTRIES = 4096
TSC_KHZ_MAX = 100_000_000       # 100 GHz


def snapshot_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """Every MSR KVM saves for a vCPU (KVM_GET_MSR_INDEX_LIST) that ``vcpu`` can read: the
    list names some the vCPU's CPUID does not give it, and KVM_GET_MSRS stops at the first
    of those, so they are taken out one by one."""
    indices = list(dict.fromkeys([*kvm.msr_index_list(), *PV_MSRS]))
    while True:
        done = len(vcpu.get_msrs(indices))
        if done == len(indices):
            return indices
        del indices[done]


def save(vm: Vm, vcpus: list[Vcpu], msrs: list[int]) -> PowerOnState:
    """The VM's and its vCPUs' state (every vCPU outside KVM_RUN); ``msrs`` are the MSRs to
    keep (the paravirtual ones are added). MSRs the host does not know are left out."""
    indices = list(dict.fromkeys([*msrs, *PV_MSRS]))

    def one(v: Vcpu) -> VcpuState:
        values = v.get_msrs(indices)
        return VcpuState(bytes(v.get_regs()), bytes(v.get_sregs()), bytes(v.get_xsave()), bytes(v.get_xcrs()),
                         bytes(v.get_lapic()), bytes(v.get_vcpu_events()), bytes(v.get_debugregs()),
                         v.get_mp_state(), tuple(values), tuple(values.values()),
                         b"".join(bytes(e) for e in v.get_cpuid2()), v.get_tsc_khz())

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
        check(len(s.cpuid) % _CPUID_ENTRY == 0 and len(s.cpuid) <= MAX_CPUID_ENTRIES * _CPUID_ENTRY,
              f"vCPU {i} CPUID must be whole entries of {_CPUID_ENTRY} bytes")
        check_int(s.tsc_khz, 1, TSC_KHZ_MAX, f"vCPU {i} TSC frequency")
    check(len(state.vm.irqchips) == len(CHIPS), f"{len(CHIPS)} interrupt controllers are saved")
    for chip in state.vm.irqchips:
        check_bytes(chip, "an interrupt controller", C.sizeof(S.kvm_irqchip))
    check_bytes(state.vm.pit, "the PIT", C.sizeof(S.kvm_pit_state2))
    check_int(state.vm.clock, 0, (1 << 64) - 1, "the clock")


def _check_tsc(vcpus: list[Vcpu], state: PowerOnState) -> None:
    """A guest calibrated its clocks to the saved TSC frequency: this host must run at it,
    or scale to it (KVM_SET_TSC_KHZ, on hosts with TSC scaling)."""
    for v, s in zip(vcpus, state.vcpus, strict=True):
        here = v.get_tsc_khz()
        if here == s.tsc_khz:
            continue
        try:
            v.set_tsc_khz(s.tsc_khz)
        except KvmError as e:
            raise SavedStateError(f"vCPU {v.index}: the guest's TSC runs at {s.tsc_khz} kHz, this host's "
                                  f"at {here} kHz, and KVM cannot scale it ({e})") from e


def restore(vm: Vm, vcpus: list[Vcpu], state: PowerOnState, *, reset: bool = False) -> None:
    """Put ``state`` back (every vCPU outside KVM_RUN, its I/O completed). A power-on reset
    (``reset``) leaves the kvmclock running, and the CPUID and TSC frequency as they are
    (KVM takes those only before a vCPU first runs); a snapshot's restore, on vCPUs that
    never ran, sets them too. SavedStateError, with nothing set, for state that does not
    fit this VM."""
    _check(vcpus, state)
    if not reset:
        _check_tsc(vcpus, state)
        for v, s in zip(vcpus, state.vcpus, strict=True):
            v.set_cpuid2([S.kvm_cpuid_entry2.from_buffer_copy(s.cpuid, at)
                          for at in range(0, len(s.cpuid), _CPUID_ENTRY)])
    for chip in state.vm.irqchips:
        vm.set_irqchip(S.kvm_irqchip.from_buffer_copy(chip))
    vm.set_pit2(S.kvm_pit_state2.from_buffer_copy(state.vm.pit))
    if not reset:
        vm.set_clock(S.kvm_clock_data(clock=state.vm.clock))
    for v, s in zip(vcpus, state.vcpus, strict=True):
        v.set_sregs(S.kvm_sregs.from_buffer_copy(s.sregs))     # first: it holds the APIC base the LAPIC needs
        v.set_regs(S.kvm_regs.from_buffer_copy(s.regs))
        v.set_xcrs(S.kvm_xcrs.from_buffer_copy(s.xcrs))
        v.set_xsave(S.kvm_xsave.from_buffer_copy(s.xsave))
        # The LAPIC before the MSRs: KVM drops a TSC deadline unless the timer is in that mode.
        v.set_lapic(S.kvm_lapic_state.from_buffer_copy(s.lapic))
        v.set_msrs(dict(zip(s.msr_indices, s.msr_values, strict=True)))
        v.set_vcpu_events(S.kvm_vcpu_events.from_buffer_copy(s.events))
        v.set_mp_state(s.mp_state)
        v.set_debugregs(S.kvm_debugregs.from_buffer_copy(s.debugregs))
