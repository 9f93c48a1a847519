"""The in-kernel GICv3's state, as plain data, through the vGIC device's register attributes
(Documentation/virt/kvm/devices/arm-vgic-v3.rst): the distributor's SPI registers, each
redistributor's SGI and PPI registers, each CPU interface's ICC_* system registers, and the
levels of the level-triggered lines. With no ITS there are no LPIs, and no pending tables in
guest RAM to save.

KVM takes the registers only with every vCPU outside KVM_RUN and the GIC initialised. A
restore goes into a GIC that :func:`.gic.finalize` has just initialised, on vCPUs with their
MPIDRs (by which a redistributor and a CPU interface are named). Its order is the one that
makes each interrupt land as it was: routing and configuration, then the line levels (which
may queue an interrupt to the vCPU its route names), then enabled, pending and active bits,
then priorities; the CPU interfaces last, ICC_CTLR_EL1 before the active priority registers
it sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...kvm import Device, Vcpu
from ...persist import check, check_int
from . import layout
from .regs import mpidrs

# Attribute groups (asm/kvm.h).
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10
VGIC_LEVEL_INFO_LINE_LEVEL = 0

WORD = 0xFFFF_FFFF
CLEAR = 0x80            # ICENABLER/ICACTIVER: 0x80 past the ISENABLER/ISACTIVER that set
SGI_FRAME = 0x10000     # a redistributor's SGI and PPI registers (GICv3 spec, 12.10)


@dataclass(frozen=True)
class Block:
    """Registers of one kind, ``words`` 32-bit words from ``offset``; ``set_only`` for those
    whose writes only set bits (a restore clears first, through the register ``CLEAR`` past)."""

    offset: int
    words: int
    set_only: bool = False

    def offsets(self) -> range:
        return range(self.offset, self.offset + 4 * self.words, 4)


def _spis(offset: int, bits: int, set_only: bool = False) -> Block:
    """A distributor register with ``bits`` per interrupt, for the SPIs only: the first 32
    interrupts' part is the redistributors' (GICv3 spec, 12.9)."""
    spis = layout.GIC_NR_IRQS - layout.GIC_SPI_BASE
    return Block(offset + layout.GIC_SPI_BASE * bits // 8, spis * bits // 32, set_only)


GICD_CTLR = Block(0x0000, 1)
# Before the line levels: where an interrupt goes and how it is taken (GICv3 spec, 12.9).
DIST_ROUTING = (GICD_CTLR, _spis(0x0080, 1), _spis(0x0C00, 2), _spis(0x6000, 64))   # IGROUPR ICFGR IROUTER
# After: ISENABLER, ISPENDR (a write sets and clears KVM's pending latch), ISACTIVER, IPRIORITYR.
DIST_STATE = (_spis(0x0100, 1, True), _spis(0x0200, 1), _spis(0x0300, 1, True), _spis(0x0400, 8))
# A redistributor's SGI frame (GICv3 spec, 12.10): IGROUPR0, then ISENABLER0, ISPENDR0,
# ISACTIVER0 and IPRIORITYR0-7. KVM keeps the SGIs edge and the PPIs level (no ICFGR).
REDIST_ROUTING = (Block(SGI_FRAME + 0x0080, 1),)
REDIST_STATE = (Block(SGI_FRAME + 0x0100, 1, True), Block(SGI_FRAME + 0x0200, 1),
                Block(SGI_FRAME + 0x0300, 1, True), Block(SGI_FRAME + 0x0400, 8))


def _icc(crn: int, crm: int, op2: int) -> int:
    """A CPU interface register's encoding as the attribute takes it (op0 3, op1 0)."""
    return 3 << 14 | crn << 7 | crm << 3 | op2


ICC_SRE_EL1 = _icc(12, 12, 5)
ICC_CTLR_EL1 = _icc(12, 12, 4)
ICC_AP0R = tuple(_icc(12, 8, 4 + n) for n in range(4))
ICC_AP1R = tuple(_icc(12, 9, n) for n in range(4))
# In restore order: SRE and CTLR first (CTLR sets the priority bits the APnRs follow).
ICC_REGS = (ICC_SRE_EL1, ICC_CTLR_EL1, _icc(12, 12, 6), _icc(12, 12, 7),   # IGRPEN0, IGRPEN1
            _icc(4, 6, 0), _icc(12, 8, 3), _icc(12, 12, 3),                 # PMR, BPR0, BPR1
            *ICC_AP0R, *ICC_AP1R)
ICC_CTLR_PRIBITS_SHIFT = 8


def _words(blocks: Sequence[Block]) -> int:
    return sum(b.words for b in blocks)


@dataclass(frozen=True)
class GicCpuState:
    """One vCPU's redistributor (REDIST_ROUTING then REDIST_STATE, a word each), CPU interface
    (ICC_REGS; an active priority register the interface does not have is 0) and PPI levels."""

    redist: tuple[int, ...]
    icc: tuple[int, ...]
    ppi_levels: int


@dataclass(frozen=True)
class GicState:
    """The distributor (DIST_ROUTING then DIST_STATE, a word each), the SPIs' line levels (a
    word for each 32), and each vCPU's part. A power-on state's is empty: a reset initialises
    the vCPUs, not the GIC."""

    dist: tuple[int, ...]
    spi_levels: tuple[int, ...]
    cpus: tuple[GicCpuState, ...]


EMPTY = GicState((), (), ())
LEVEL_WORDS = range(layout.GIC_SPI_BASE, layout.GIC_NR_IRQS, 32)       # the first INTID of each


def _cpu_attr(mpidr: int) -> int:
    """An attribute's vCPU field: its MPIDR's affinities, Aff3 in the top byte."""
    return ((mpidr >> 32 & 0xFF) << 24 | mpidr & 0xFF_FFFF) << 32


def _level_attr(cpu: int, intid: int) -> int:
    return cpu | VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid


def _active_priority_regs(ctlr: int) -> int:
    """How many of ICC_AP0Rn (and ICC_AP1Rn) a CPU interface has: 4 with 7 priority bits, 2 with
    6, else 1 (GICv3 spec, 12.2.1)."""
    bits = (ctlr >> ICC_CTLR_PRIBITS_SHIFT & 7) + 1
    return 4 if bits == 7 else 2 if bits == 6 else 1


def _present(ctlr: int) -> set[int]:
    n = _active_priority_regs(ctlr)
    return {*ICC_REGS} - {*ICC_AP0R[n:], *ICC_AP1R[n:]}


def save(device: Device, vcpus: Sequence[Vcpu]) -> GicState:
    """The GIC's state; every vCPU outside KVM_RUN."""
    def read(group: int, cpu: int, blocks: Sequence[Block]) -> list[int]:
        return [device.get_attr(group, cpu | off) for b in blocks for off in b.offsets()]

    def one(cpu: int) -> GicCpuState:
        redist = read(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu, (*REDIST_ROUTING, *REDIST_STATE))
        present = _present(device.get_attr(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu | ICC_CTLR_EL1))
        icc = [device.get_attr(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu | reg) if reg in present else 0
               for reg in ICC_REGS]
        return GicCpuState(tuple(redist), tuple(icc),
                           device.get_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpu, 0)))

    cpus = [_cpu_attr(m) for m in mpidrs(vcpus)]
    spi_levels = [device.get_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpus[0], intid))
                  for intid in LEVEL_WORDS]
    return GicState(tuple(read(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, (*DIST_ROUTING, *DIST_STATE))),
                    tuple(spi_levels), tuple(one(cpu) for cpu in cpus))


def check_state(state: GicState, vcpus: int) -> None:
    """SavedStateError unless ``state`` is a GIC of this board's with ``vcpus`` CPU interfaces."""
    check(len(state.dist) == _words((*DIST_ROUTING, *DIST_STATE)), "the GIC's distributor has the wrong size")
    check(len(state.spi_levels) == len(LEVEL_WORDS), "the GIC's line levels have the wrong size")
    check(len(state.cpus) == vcpus, f"{len(state.cpus)} GIC CPU interfaces saved; this VM has {vcpus} vCPUs")
    for word in (*state.dist, *state.spi_levels):
        check_int(word, 0, WORD, "a GIC distributor register")
    for i, cpu in enumerate(state.cpus):
        check(len(cpu.redist) == _words((*REDIST_ROUTING, *REDIST_STATE)) and len(cpu.icc) == len(ICC_REGS),
              f"vCPU {i}: the GIC's redistributor or CPU interface has the wrong size")
        for word in (*cpu.redist, cpu.ppi_levels):
            check_int(word, 0, WORD, f"vCPU {i}: a GIC redistributor register")
        for value in cpu.icc:
            check_int(value, 0, (1 << 64) - 1, f"vCPU {i}: a GIC CPU interface register")


def restore(device: Device, vcpus: Sequence[Vcpu], state: GicState) -> None:
    """Put ``state`` (checked by :func:`check_state`) into the just initialised GIC; KvmError
    for a register KVM refuses (a CPU interface with more priority bits than this host's)."""
    def write(group: int, cpu: int, blocks: Sequence[Block], values: Sequence[int]) -> None:
        it = iter(values)
        for b in blocks:
            for off in b.offsets():
                value = next(it)
                if b.set_only:
                    device.set_attr(group, cpu | (off + CLEAR), ~value & WORD)
                device.set_attr(group, cpu | off, value)

    cpus = [_cpu_attr(m) for m in mpidrs(vcpus)]
    routing = _words(DIST_ROUTING)
    write(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, DIST_ROUTING, state.dist[:routing])
    for intid, level in zip(LEVEL_WORDS, state.spi_levels, strict=True):
        device.set_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpus[0], intid), level)
    write(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, DIST_STATE, state.dist[routing:])
    routing = _words(REDIST_ROUTING)
    for cpu, s in zip(cpus, state.cpus, strict=True):
        write(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu, REDIST_ROUTING, s.redist[:routing])
        device.set_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpu, 0), s.ppi_levels)
        write(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu, REDIST_STATE, s.redist[routing:])
    for cpu, s in zip(cpus, state.cpus, strict=True):
        present = _present(s.icc[ICC_REGS.index(ICC_CTLR_EL1)])
        for reg, value in zip(ICC_REGS, s.icc, strict=True):
            if reg in present:
                device.set_attr(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu | reg, value)
