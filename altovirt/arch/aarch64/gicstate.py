"""The in-kernel GIC's state, as plain data, through the vGIC device's register attributes
(Documentation/virt/kvm/devices/arm-vgic-v3.rst, arm-vgic.rst): the distributor's SPI
registers; each vCPU's SGI and PPI registers (a GICv3's redistributor, a GICv2's banked
distributor registers) and CPU interface (a GICv3's ICC_* system registers, a GICv2's GICC
registers); on a GICv3 the levels of the level-triggered lines too. An ITS's state and its
LPIs' are :mod:`.itsstate`'s.

KVM takes the registers only with every vCPU outside KVM_RUN and the GIC initialised. A
restore goes into a GIC that :func:`.gic.finalize` has just initialised, on vCPUs with their
MPIDRs (by which a GICv3's redistributor and CPU interface are named; a GICv2's go by vCPU
index). Its order is the one that makes each interrupt land as it was: routing and
configuration, then the line levels (which may queue an interrupt to the vCPU its route
names), then enabled, pending and active bits, then priorities; the CPU interfaces last,
ICC_CTLR_EL1 before the active priority registers it sizes.
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
KVM_DEV_ARM_VGIC_GRP_CPU_REGS = 2
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_DEV_ARM_VGIC_CPUID_SHIFT = 32       # a GICv2 attribute's vCPU index
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10
VGIC_LEVEL_INFO_LINE_LEVEL = 0

WORD = 0xFFFF_FFFF
SET_CLEAR = 0x80        # ICENABLER, ICPENDR, ICACTIVER: 0x80 past the registers that set
SGI_FRAME = 0x10000     # a GICv3 redistributor's SGI and PPI registers (GICv3 spec, 12.10)


@dataclass(frozen=True)
class Block:
    """Registers of one kind, ``words`` 32-bit words from ``offset``. ``clear``: for registers
    whose writes only set bits, how far the register that clears them is (a restore clears
    first); 0 for a plain write."""

    offset: int
    words: int
    clear: int = 0

    def offsets(self) -> range:
        return range(self.offset, self.offset + 4 * self.words, 4)


def _spis(offset: int, bits: int, clear: int = 0) -> Block:
    """A distributor register with ``bits`` per interrupt, for the SPIs only: the first 32
    interrupts' part is each vCPU's (GICv3 spec, 12.9; GICv2 spec, 4.3)."""
    spis = layout.GIC_NR_IRQS - layout.GIC_SPI_BASE
    return Block(offset + layout.GIC_SPI_BASE * bits // 8, spis * bits // 32, clear)


def _icc(crn: int, crm: int, op2: int) -> int:
    """A CPU interface register's encoding as the attribute takes it (op0 3, op1 0)."""
    return 3 << 14 | crn << 7 | crm << 3 | op2


ICC_SRE_EL1 = _icc(12, 12, 5)
ICC_CTLR_EL1 = _icc(12, 12, 4)
ICC_AP0R = tuple(_icc(12, 8, 4 + n) for n in range(4))
ICC_AP1R = tuple(_icc(12, 9, n) for n in range(4))
ICC_CTLR_PRIBITS_SHIFT = 8
GICD_CTLR = Block(0x0000, 1)


@dataclass(frozen=True)
class Layout:
    """Where a GIC version keeps what a snapshot saves, in restore order: the distributor's
    routing (before the line levels) and state; each vCPU's registers (in ``cpu_group``),
    routing and state alike; its CPU interface's registers (in ``iface_group``)."""

    dist_routing: tuple[Block, ...]
    dist_state: tuple[Block, ...]
    cpu_group: int
    cpu_routing: tuple[Block, ...]
    cpu_state: tuple[Block, ...]
    iface_group: int
    iface_regs: tuple[int, ...]
    levels: bool                    # the line levels are attributes of their own (GICv3)

    @property
    def dist_words(self) -> int:
        return sum(b.words for b in (*self.dist_routing, *self.dist_state))

    @property
    def cpu_words(self) -> int:
        return sum(b.words for b in (*self.cpu_routing, *self.cpu_state))


LAYOUTS = {
    # IGROUPR, ICFGR, IROUTER; ISENABLER, ISPENDR (a write sets and clears KVM's pending latch),
    # ISACTIVER, IPRIORITYR. A redistributor's IGROUPR0; ISENABLER0, ISPENDR0, ISACTIVER0 and
    # IPRIORITYR0-7 (KVM keeps the SGIs edge and the PPIs level: no ICFGR). SRE and CTLR first
    # (CTLR sets the priority bits the APnRs follow), IGRPEN0, IGRPEN1, PMR, BPR0, BPR1, APnRs.
    3: Layout((GICD_CTLR, _spis(0x0080, 1), _spis(0x0C00, 2), _spis(0x6000, 64)),
              (_spis(0x0100, 1, SET_CLEAR), _spis(0x0200, 1), _spis(0x0300, 1, SET_CLEAR), _spis(0x0400, 8)),
              KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, (Block(SGI_FRAME + 0x0080, 1),),
              (Block(SGI_FRAME + 0x0100, 1, SET_CLEAR), Block(SGI_FRAME + 0x0200, 1),
               Block(SGI_FRAME + 0x0300, 1, SET_CLEAR), Block(SGI_FRAME + 0x0400, 8)),
              KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
              (ICC_SRE_EL1, ICC_CTLR_EL1, _icc(12, 12, 6), _icc(12, 12, 7), _icc(4, 6, 0), _icc(12, 8, 3),
               _icc(12, 12, 3), *ICC_AP0R, *ICC_AP1R), True),
    # The same, with ITARGETSR for IROUTER and ISPENDR set-only (ICPENDR clears); each vCPU's
    # banked distributor registers, with the SGIs' pending bits by source (SPENDSGIR, which
    # CPENDSGIR 0x10 below clears); GICC_CTLR, PMR, BPR, ABPR, APR0 (GICv2 spec, 4.3-4.4).
    2: Layout((GICD_CTLR, _spis(0x0080, 1), _spis(0x0C00, 2), _spis(0x0800, 8)),
              (_spis(0x0100, 1, SET_CLEAR), _spis(0x0200, 1, SET_CLEAR), _spis(0x0300, 1, SET_CLEAR),
               _spis(0x0400, 8)),
              KVM_DEV_ARM_VGIC_GRP_DIST_REGS, (Block(0x0080, 1),),
              (Block(0x0100, 1, SET_CLEAR), Block(0x0200, 1, SET_CLEAR), Block(0x0300, 1, SET_CLEAR),
               Block(0x0400, 8), Block(0x0F20, 4, -0x10)),
              KVM_DEV_ARM_VGIC_GRP_CPU_REGS, (0x00, 0x04, 0x08, 0x1C, 0xD0), False),
}


@dataclass(frozen=True)
class GicCpuState:
    """One vCPU's registers (its layout's cpu_routing then cpu_state, a word each), its CPU
    interface's (iface_regs; an active priority register the interface does not have is 0),
    and its PPIs' levels (0 on a GICv2)."""

    redist: tuple[int, ...]
    icc: tuple[int, ...]
    ppi_levels: int


@dataclass(frozen=True)
class GicState:
    """A GIC of ``version``: the distributor (dist_routing then dist_state, a word each), the
    SPIs' line levels (a word for each 32; none on a GICv2), and each vCPU's part. A power-on
    state's is empty: a reset initialises the vCPUs, not the GIC."""

    version: int
    dist: tuple[int, ...]
    spi_levels: tuple[int, ...]
    cpus: tuple[GicCpuState, ...]


EMPTY = GicState(0, (), (), ())
LEVEL_WORDS = range(layout.GIC_SPI_BASE, layout.GIC_NR_IRQS, 32)       # the first INTID of each


def cpu_attrs(version: int, vcpus: Sequence[Vcpu]) -> list[int]:
    """Each vCPU's field of an attribute: a GICv3's, its MPIDR's affinities (Aff3 in the top
    byte); a GICv2's, its index."""
    if version == 2:
        return [v.index << KVM_DEV_ARM_VGIC_CPUID_SHIFT for v in vcpus]
    return [((m >> 32 & 0xFF) << 24 | m & 0xFF_FFFF) << 32 for m in mpidrs(vcpus)]


def _level_attr(cpu: int, intid: int) -> int:
    return cpu | VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid


def _present(version: int, iface: dict[int, int]) -> tuple[int, ...]:
    """The CPU interface registers there are: a GICv3's active priority registers by its
    priority bits, from ICC_CTLR_EL1 (4 with 7 bits, 2 with 6, else 1: GICv3 spec, 12.2.1)."""
    regs = LAYOUTS[version].iface_regs
    if version == 2:
        return regs
    bits = (iface[ICC_CTLR_EL1] >> ICC_CTLR_PRIBITS_SHIFT & 7) + 1
    n = 4 if bits == 7 else 2 if bits == 6 else 1
    return tuple(r for r in regs if r not in (*ICC_AP0R[n:], *ICC_AP1R[n:]))


def save(device: Device, vcpus: Sequence[Vcpu], version: int) -> GicState:
    """The state of the GIC of ``version``; every vCPU outside KVM_RUN."""
    lay = LAYOUTS[version]

    def read(group: int, cpu: int, blocks: Sequence[Block]) -> list[int]:
        return device.get_attrs(group, (cpu | off for b in blocks for off in b.offsets()))

    def one(cpu: int) -> GicCpuState:
        iface = {ICC_CTLR_EL1: device.get_attr(lay.iface_group, cpu | ICC_CTLR_EL1)} if version == 3 else {}
        present = _present(version, iface)
        icc = [device.get_attr(lay.iface_group, cpu | reg) if reg in present else 0 for reg in lay.iface_regs]
        levels = device.get_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpu, 0)) if lay.levels else 0
        return GicCpuState(tuple(read(lay.cpu_group, cpu, (*lay.cpu_routing, *lay.cpu_state))), tuple(icc),
                           levels)

    cpus = cpu_attrs(version, vcpus)
    spi_levels = [device.get_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpus[0], intid))
                  for intid in LEVEL_WORDS] if lay.levels else []
    dist = read(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, (*lay.dist_routing, *lay.dist_state))
    return GicState(version, tuple(dist), tuple(spi_levels), tuple(one(cpu) for cpu in cpus))


def check_state(state: GicState, version: int, vcpus: int) -> None:
    """SavedStateError unless ``state`` is this board's GIC of ``version`` with ``vcpus`` CPU
    interfaces."""
    check(state.version == version, f"a GICv{state.version} saved; this VM's is a GICv{version}")
    lay = LAYOUTS[version]
    check(len(state.dist) == lay.dist_words, "the GIC's distributor has the wrong size")
    check(len(state.spi_levels) == (len(LEVEL_WORDS) if lay.levels else 0),
          "the GIC's line levels have the wrong size")
    check(len(state.cpus) == vcpus, f"{len(state.cpus)} GIC CPU interfaces saved; this VM has {vcpus} vCPUs")
    for word in (*state.dist, *state.spi_levels):
        check_int(word, 0, WORD, "a GIC distributor register")
    for i, cpu in enumerate(state.cpus):
        check(len(cpu.redist) == lay.cpu_words and len(cpu.icc) == len(lay.iface_regs),
              f"vCPU {i}: the GIC's redistributor or CPU interface has the wrong size")
        for word in (*cpu.redist, cpu.ppi_levels):
            check_int(word, 0, WORD, f"vCPU {i}: a GIC redistributor register")
        for value in cpu.icc:
            check_int(value, 0, (1 << 64) - 1, f"vCPU {i}: a GIC CPU interface register")


def restore(device: Device, vcpus: Sequence[Vcpu], state: GicState) -> None:
    """Put ``state`` (checked by :func:`check_state`) into the just initialised GIC; KvmError
    for a register KVM refuses (a CPU interface with more priority bits than this host's)."""
    lay = LAYOUTS[state.version]

    def write(group: int, cpu: int, blocks: Sequence[Block], values: Sequence[int]) -> None:
        it = iter(values)
        pairs = []
        for b in blocks:
            for off in b.offsets():
                value = next(it)
                if b.clear:
                    pairs.append((cpu | (off + b.clear), ~value & WORD))
                pairs.append((cpu | off, value))
        device.set_attrs(group, pairs)

    cpus = cpu_attrs(state.version, vcpus)
    routing = sum(b.words for b in lay.dist_routing)
    write(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, lay.dist_routing, state.dist[:routing])
    for intid, level in zip(LEVEL_WORDS, state.spi_levels, strict=False):
        device.set_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpus[0], intid), level)
    write(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, lay.dist_state, state.dist[routing:])
    routing = sum(b.words for b in lay.cpu_routing)
    for cpu, s in zip(cpus, state.cpus, strict=True):
        write(lay.cpu_group, cpu, lay.cpu_routing, s.redist[:routing])
        if lay.levels:
            device.set_attr(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(cpu, 0), s.ppi_levels)
        write(lay.cpu_group, cpu, lay.cpu_state, s.redist[routing:])
    for cpu, s in zip(cpus, state.cpus, strict=True):
        present = _present(state.version, dict(zip(lay.iface_regs, s.icc, strict=True)))
        for reg, value in zip(lay.iface_regs, s.icc, strict=True):
            if reg in present:
                device.set_attr(lay.iface_group, cpu | reg, value)
