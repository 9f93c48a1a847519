"""A GICv3 ITS's state and its LPIs', as plain data (Documentation/virt/kvm/devices/
arm-vgic-its.rst, "ITS Save/Restore"; arm-vgic-v3.rst): the ITS's registers and each
redistributor's LPI registers (GICR_PROPBASER, GICR_PENDBASER, GICR_CTLR). What the ITS
translates (its device, collection and interrupt translation tables) and which LPIs are
pending live in tables in guest RAM; KVM writes them there on :func:`save`, so the guest's
memory carries them, and reads them back on :func:`restore`.

QEMU writes them when the VM stops; here :func:`save` does, as the snapshot's state is taken
before the memory that holds the tables is written or sent for the last time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...kvm import Device, Vcpu
from ...persist import check, check_int
from .gicstate import KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu_attrs

# Attribute groups and attributes (asm/kvm.h).
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_GRP_ITS_REGS = 8
KVM_DEV_ARM_ITS_SAVE_TABLES = 1
KVM_DEV_ARM_ITS_RESTORE_TABLES = 2
KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES = 3    # on the GICv3 device
KVM_DEV_ARM_ITS_CTRL_RESET = 4

# ITS registers (GICv3 spec, 12.19), in restore order: IIDR first (it names the table
# layout), CBASER before CREADR and CWRITER (a write to CBASER zeroes both), the BASERs,
# then the tables; CTLR, which turns the ITS on, last.
GITS_CTLR = 0x0000
GITS_IIDR = 0x0004
GITS_CBASER = 0x0080
GITS_CWRITER = 0x0088
GITS_CREADR = 0x0090
GITS_BASER = tuple(0x0100 + 8 * n for n in range(8))
ITS_REGS = (GITS_IIDR, GITS_CBASER, GITS_CREADR, GITS_CWRITER, *GITS_BASER)

# A redistributor's LPI registers (GICv3 spec, 12.11), read and written 32 bits at a time
# (KVM's redistributor attributes are 32-bit): the tables' bases before GICR_CTLR, as KVM
# ignores them once EnableLPIs is set.
GICR_CTLR = 0x0000
GICR_PROPBASER = 0x0070
GICR_PENDBASER = 0x0078
BASES = (GICR_PROPBASER, GICR_PENDBASER)
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class ItsState:
    """The ITS's registers (ITS_REGS, then GITS_CTLR) and each vCPU's redistributor's
    (GICR_PROPBASER, GICR_PENDBASER, GICR_CTLR)."""

    regs: tuple[int, ...]
    redists: tuple[tuple[int, ...], ...]


def save(gic: Device, its: Device, vcpus: Sequence[Vcpu]) -> ItsState:
    """The ITS's state, its tables and the LPIs' pending bits written into guest RAM; every
    vCPU outside KVM_RUN."""
    gic.set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES)
    its.set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_SAVE_TABLES)
    regs = [its.get_attr(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg) for reg in (*ITS_REGS, GITS_CTLR)]

    def redist(cpu: int) -> tuple[int, ...]:
        def read(off: int) -> int:
            return gic.get_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | off)
        return (*(read(base) | read(base + 4) << 32 for base in BASES), read(GICR_CTLR))

    return ItsState(tuple(regs), tuple(redist(cpu) for cpu in cpu_attrs(3, vcpus)))


def check_state(state: ItsState, vcpus: int) -> None:
    """SavedStateError unless ``state`` is an ITS's with ``vcpus`` redistributors."""
    check(len(state.regs) == len(ITS_REGS) + 1, "the ITS's registers have the wrong size")
    check(len(state.redists) == vcpus,
          f"{len(state.redists)} LPI redistributors saved; this VM has {vcpus} vCPUs")
    for value in state.regs:
        check_int(value, 0, U64, "an ITS register")
    for i, redist in enumerate(state.redists):
        check(len(redist) == len(BASES) + 1, f"vCPU {i}: the LPI registers have the wrong size")
        for value in redist:
            check_int(value, 0, U64, f"vCPU {i}: an LPI register")


def restore(gic: Device, its: Device, vcpus: Sequence[Vcpu], state: ItsState) -> None:
    """Put ``state`` (checked by :func:`check_state`) into the just initialised ITS and the
    redistributors, whose other registers are in; guest RAM, holding the tables, is in.
    KvmError for a register or table KVM refuses."""
    for cpu, redist in zip(cpu_attrs(3, vcpus), state.redists, strict=True):
        for base, value in zip(BASES, redist[:-1], strict=True):
            gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | base, value & 0xFFFF_FFFF)
            gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | (base + 4), value >> 32)
        gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | GICR_CTLR, redist[-1])
    for reg, value in zip(ITS_REGS, state.regs[:-1], strict=True):
        its.set_attr(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg, value)
    its.set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_RESTORE_TABLES)
    its.set_attr(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, GITS_CTLR, state.regs[-1])


def reset(gic: Device, its: Device, vcpus: Sequence[Vcpu]) -> None:
    """The ITS and the LPIs as at power-on, for a machine reset: every redistributor's LPIs
    off and its tables' bases cleared, the ITS emptied (KVM_DEV_ARM_ITS_CTRL_RESET), as
    QEMU's reset does; a rebooted guest would otherwise find LPIs on and its old tables."""
    for cpu in cpu_attrs(3, vcpus):
        gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | GICR_CTLR, 0)
        for base in BASES:
            gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | base, 0)
            gic.set_attr(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | (base + 4), 0)
    its.set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_CTRL_RESET)
