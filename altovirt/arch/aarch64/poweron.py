"""The state KVM holds for an arm64 VM, as plain data: each vCPU's registers, every one
KVM lists (KVM_GET_REG_LIST), and its power state.

A reset is KVM_ARM_VCPU_INIT again, which puts a vCPU's registers back to their reset values
and powers the secondaries off (api.rst, 4.82), as QEMU's and Firecracker's resets do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...kvm import Vcpu, Vm
from ...persist import SavedStateError, check, check_int
from . import regs

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


@dataclass(frozen=True)
class PowerOnState:
    vcpus: tuple[VcpuState, ...]


def snapshot_registers(kvm: object, vcpu: Vcpu) -> list[int]:
    """The registers a snapshot keeps: every one KVM lists for ``vcpu``."""
    return vcpu.reg_list()


def save(vm: Vm, vcpus: Sequence[Vcpu], reg_ids: Sequence[int]) -> PowerOnState:
    """Every vCPU's registers ``reg_ids`` and MP state (every vCPU outside KVM_RUN)."""
    def one(v: Vcpu) -> VcpuState:
        return VcpuState(tuple(reg_ids), tuple(v.get_one_reg_bytes(r, reg_size(r)) for r in reg_ids),
                         v.get_mp_state())

    return PowerOnState(tuple(one(v) for v in vcpus))


def _check(vcpus: Sequence[Vcpu], state: PowerOnState) -> None:
    check(len(state.vcpus) == len(vcpus), f"{len(state.vcpus)} vCPUs saved; this VM has {len(vcpus)}")
    for i, s in enumerate(state.vcpus):
        check(len(s.reg_ids) == len(s.reg_values) <= MAX_REGS, f"vCPU {i}: registers and values differ")
        for reg_id, value in zip(s.reg_ids, s.reg_values, strict=True):
            check_int(reg_id, 0, (1 << 64) - 1, f"vCPU {i} register id")
            check(len(value) == reg_size(reg_id), f"vCPU {i} register {reg_id:#x} has the wrong size")
        check_int(s.mp_state, 0, MP_STATE_MAX, f"vCPU {i} mp_state")


def restore(vm: Vm, vcpus: Sequence[Vcpu], state: PowerOnState, *, reset: bool = False) -> None:
    """A power-on reset (``reset``): every vCPU initialised again. Otherwise SavedStateError:
    an arm64 VM's interrupt controller state is not saved yet, so a snapshot cannot be
    restored."""
    _check(vcpus, state)
    if not reset:
        raise SavedStateError("arm64 snapshots cannot be restored yet: the GIC's state is not saved")
    regs.init_vcpus(vcpus)
