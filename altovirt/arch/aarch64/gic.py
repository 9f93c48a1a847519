"""The in-kernel GIC at the addresses of :mod:`.layout`: a GICv3
(Documentation/virt/kvm/devices/arm-vgic-v3.rst), or, on a host whose GIC is a v2 (whose KVM
has no GICv3 to emulate), a GICv2 (arm-vgic.rst) for up to 8 vCPUs, as Firecracker and QEMU
fall back to one.

Made in two steps, as KVM wants: :func:`create` once guest RAM is registered (the device
and its addresses), :func:`finalize` once every vCPU exists and is initialised
(``KVM_DEV_ARM_VGIC_CTRL_INIT``, which sizes the redistributors by the vCPUs). The GIC's
fd is one of the VM's devices (``Vm.devices``), closed with it. What :func:`create` made
(:class:`Gic`) is what the device tree describes.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ...kvm import Device, KvmError, Vm
from . import layout

KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_TYPE_ARM_VGIC_ITS = 8       # arm-vgic-its.rst
# Attribute groups and attributes (asm/kvm.h).
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V2_ADDR_TYPE_DIST = 0
KVM_VGIC_V2_ADDR_TYPE_CPU = 1
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION = 5
KVM_VGIC_ITS_ADDR_TYPE = 4
GICV2_MAX_CPUS = 8                  # GICv2 architecture spec, 1.3: CPU interfaces 0-7
VERSIONS = {KVM_DEV_TYPE_ARM_VGIC_V3: 3, KVM_DEV_TYPE_ARM_VGIC_V2: 2}


@dataclass(frozen=True)
class Gic:
    """A GIC as made: its version (3 or 2) and its per-CPU regions, (base, size) each: a
    GICv3's redistributor regions, a GICv2's CPU interface."""

    version: int
    regions: tuple[tuple[int, int], ...]
    its: tuple[int, int] | None = None      # the ITS's frame (base, size): MSIs, for PCI

# KVM_IRQ_LINE's irq field on arm64 (api.rst, 4.25): type, vCPU, INTID.
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_TYPE_SPI = 1


def spi_line(spi: int) -> int:
    """KVM_IRQ_LINE's irq for SPI ``spi``."""
    return KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT | (layout.GIC_SPI_BASE + spi)


def _redist_region_attr(index: int, base: int, cpus: int) -> int:
    """KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION's value: count, base, flags 0, index."""
    return cpus << 52 | base | index


def create(vm: Vm, cpus: int, ram_end: int, *, its: bool = False) -> Gic:
    """The GIC for ``cpus`` vCPUs, one of ``vm.devices``: a GICv3, with an ITS too for
    ``its`` (PCI's MSIs), else a GICv2 (which has none: PCI functions then use INTx). KvmError
    if KVM can make neither, or only a GICv2 and ``cpus`` is more than it serves."""
    try:
        device = vm.create_device(KVM_DEV_TYPE_ARM_VGIC_V3)
    except KvmError as e:
        if e.errno != errno.ENODEV:
            raise
        return _create_v2(vm, cpus)
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, layout.GIC_DIST_BASE)
    regions = layout.redist_regions(cpus, ram_end)
    if len(regions) == 1:
        device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, regions[0][0])
    else:
        for index, (base, size) in enumerate(regions):
            value = _redist_region_attr(index, base, size // layout.GIC_REDIST_STRIDE)
            device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION, value)
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout.GIC_NR_IRQS)
    if not its:
        return Gic(3, tuple(regions))
    its_device = vm.create_device(KVM_DEV_TYPE_ARM_VGIC_ITS)
    its_device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_ITS_ADDR_TYPE, layout.GIC_ITS_BASE)
    return Gic(3, tuple(regions), (layout.GIC_ITS_BASE, layout.GIC_ITS_SIZE))


def _create_v2(vm: Vm, cpus: int) -> Gic:
    if cpus > GICV2_MAX_CPUS:
        raise KvmError(f"this host's GIC is a GICv2, which serves at most {GICV2_MAX_CPUS} "
                       f"vCPUs; the VM has {cpus}")
    try:
        device = vm.create_device(KVM_DEV_TYPE_ARM_VGIC_V2)
    except KvmError as e:
        raise KvmError(e.errno, f"this host's KVM emulates neither a GICv3 nor a GICv2 ({e}); AltoVirt's "
                       "arm64 board needs one") from e
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_DIST, layout.GIC_DIST_BASE)
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_CPU, layout.GIC_CPU_BASE)
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout.GIC_NR_IRQS)
    return Gic(2, ((layout.GIC_CPU_BASE, layout.GIC_CPU_SIZE),))


def device(vm: Vm) -> Device:
    """The GIC :func:`create` made."""
    return next(d for d in vm.devices if d.kind in VERSIONS)


def version(vm: Vm) -> int:
    """The version of the GIC :func:`create` made: 3 or 2."""
    return VERSIONS[device(vm).kind]


def its_device(vm: Vm) -> Device | None:
    """The ITS :func:`create` made, if it made one."""
    return next((d for d in vm.devices if d.kind == KVM_DEV_TYPE_ARM_VGIC_ITS), None)


def finalize(vm: Vm) -> None:
    """Initialise the GIC, then its ITS if it has one: every vCPU exists and is initialised."""
    device(vm).set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT)
    its = its_device(vm)
    if its is not None:
        its.set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT)
