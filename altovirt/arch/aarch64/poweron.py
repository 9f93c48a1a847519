"""The state KVM holds for an arm64 VM, as plain data: each vCPU's registers, every one
KVM lists (KVM_GET_REG_LIST), and its power state; the GIC's (:mod:`.gicstate`) and its ITS's
(:mod:`.itsstate`); the guest's clock.

A reset is KVM_ARM_VCPU_INIT again, which puts a vCPU's registers back to their reset values
and powers the secondaries off (api.rst, 4.82), as QEMU's and Firecracker's resets do; an
ITS's LPIs go off and its tables are dropped (:func:`.itsstate.reset`). A
snapshot's restore goes into vCPUs just initialised and a GIC just made: the registers in
KVM's list order (the ID registers before those they govern), the MP state, then the GIC,
whose redistributors are found by the vCPUs' MPIDRs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...kvm import Vcpu, Vm
from ...persist import SavedStateError, check, check_int
from . import gic, gicstate, itsstate, regs
from .gicstate import GicState
from .itsstate import ItsState

# A register id's size field (<linux/kvm.h> KVM_REG_SIZE_MASK): the value is 2**n bytes.
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0xF << KVM_REG_SIZE_SHIFT
MAX_REGS = 4096
MP_STATE_MAX = 10


def reg_size(reg_id: int) -> int:
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


@dataclass(frozen=True)
class VcpuState:
    """One vCPU: every register KVM lists, by id, and its MP state."""

    reg_ids: tuple[int, ...]
    reg_values: tuple[bytes, ...]
    mp_state: int


NO_ITS = ItsState((), ())


@dataclass(frozen=True)
class VmState:
    """The GIC, the guest's clock (its virtual counter at the pause) and the GIC's ITS (empty
    for a VM with none, or saved before AltoVirt made one)."""

    gic: GicState
    clock: int
    its: ItsState = NO_ITS


@dataclass(frozen=True)
class PowerOnState:
    vcpus: tuple[VcpuState, ...]
    vm: VmState


def snapshot_registers(kvm: object, vcpu: Vcpu) -> list[int]:
    """The registers a snapshot keeps: every one KVM lists for ``vcpu``."""
    return vcpu.reg_list()


def host_cpu(kvm: object, vcpu: Vcpu, template: object) -> dict[str, Any]:
    """The host CPU as a snapshot's header records it: KVM's vCPU target, the MIDR_EL1 the
    guest reads (which KVM will not let another CPU's VM take, whatever the template) and
    the GIC's version."""
    return {"target": vcpu.vm.arm_preferred_target().target, "midr": vcpu.get_one_reg(regs.MIDR_EL1),
            "gic": gic.version(vcpu.vm)}


def check_cpu(saved: object, here: dict[str, Any]) -> None:
    """SavedStateError unless the guest was saved on this kind of CPU: KVM's target, the MIDR
    (implementer, variant, part, revision) and the GIC the same."""
    if not isinstance(saved, dict) or not isinstance(saved.get("midr"), int):
        raise SavedStateError("the host CPU is not recorded")
    if saved.get("gic") != here["gic"]:
        raise SavedStateError(f"saved with a GICv{saved.get('gic')}; this host's is a GICv{here['gic']}")
    if saved != here:
        raise SavedStateError(f"saved on a CPU with MIDR_EL1 {saved['midr']:#x} (KVM target "
                              f"{saved.get('target')}); this host's is {here['midr']:#x} "
                              f"(target {here['target']})")


def save(vm: Vm, vcpus: Sequence[Vcpu], reg_ids: Sequence[int]) -> PowerOnState:
    """Every vCPU's registers ``reg_ids`` and MP state, and, for a snapshot (``reg_ids``
    given), the GIC's state and the clock (every vCPU outside KVM_RUN)."""
    sized = [(r, reg_size(r)) for r in reg_ids]

    def one(v: Vcpu) -> VcpuState:
        return VcpuState(tuple(reg_ids), tuple(v.get_one_regs(sized)), v.get_mp_state())

    if not reg_ids:
        return PowerOnState(tuple(one(v) for v in vcpus), VmState(gicstate.EMPTY, 0))
    its = gic.its_device(vm)
    state = gicstate.save(gic.device(vm), vcpus, gic.version(vm))
    its_state = NO_ITS if its is None else itsstate.save(gic.device(vm), its, vcpus)
    clock = vcpus[0].get_one_reg(regs.KVM_REG_ARM_TIMER_CNT)
    return PowerOnState(tuple(one(v) for v in vcpus), VmState(state, clock, its_state))


def _check(vcpus: Sequence[Vcpu], state: PowerOnState) -> None:
    check(len(state.vcpus) == len(vcpus), f"{len(state.vcpus)} vCPUs saved; this VM has {len(vcpus)}")
    for i, s in enumerate(state.vcpus):
        check(len(s.reg_ids) == len(s.reg_values) <= MAX_REGS, f"vCPU {i}: registers and values differ")
        # Whole, as a live migration's downtime waits for this; the culprit named if one is bad.
        if not all(type(r) is int and 0 <= r < 1 << 64 and len(v) == reg_size(r)
                   for r, v in zip(s.reg_ids, s.reg_values, strict=True)):
            for reg_id, value in zip(s.reg_ids, s.reg_values, strict=True):
                check_int(reg_id, 0, (1 << 64) - 1, f"vCPU {i} register id")
                check(len(value) == reg_size(reg_id), f"vCPU {i} register {reg_id:#x} has the wrong size")
        check_int(s.mp_state, 0, MP_STATE_MAX, f"vCPU {i} mp_state")
    check_int(state.vm.clock, 0, (1 << 64) - 1, "the clock")


def restore(vm: Vm, vcpus: Sequence[Vcpu], state: PowerOnState, *, reset: bool = False) -> None:
    """A power-on reset (``reset``): every vCPU initialised again. Otherwise a snapshot's
    state, into vCPUs and a GIC that never ran. SavedStateError, with nothing set, for state
    that does not fit; KvmError for a register KVM refuses (from another kind of host)."""
    _check(vcpus, state)
    its = gic.its_device(vm)
    if reset:
        regs.init_vcpus(vcpus)
        if its is not None:
            itsstate.reset(gic.device(vm), its, vcpus)
        return
    gicstate.check_state(state.vm.gic, gic.version(vm), len(vcpus))
    check((state.vm.its != NO_ITS) == (its is not None),
          "the GIC's ITS saved, but this VM has none (-machine virt puts its devices on PCI)" if its is None
          else "no GIC ITS saved; this VM has one (a -machine virt VM's devices are on PCI)")
    if its is not None:
        itsstate.check_state(state.vm.its, len(vcpus))
    for v, s in zip(vcpus, state.vcpus, strict=True):
        v.set_one_regs(zip(s.reg_ids, s.reg_values, strict=True))
        v.set_mp_state(s.mp_state)
    gicstate.restore(gic.device(vm), vcpus, state.vm.gic)
    if its is not None:
        itsstate.restore(gic.device(vm), its, vcpus, state.vm.its)
