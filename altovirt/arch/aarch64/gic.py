"""The in-kernel GICv3 (Documentation/virt/kvm/devices/arm-vgic-v3.rst) at the addresses of
:mod:`.layout`. A host that emulates only a GICv2 is refused: the device tree describes a v3.

Made in two steps, as KVM wants: :func:`create` once guest RAM is registered (the device
and its addresses), :func:`finalize` once every vCPU exists and is initialised
(``KVM_DEV_ARM_VGIC_CTRL_INIT``, which sizes the redistributors by the vCPUs). The GIC's
fd is one of the VM's devices (``Vm.devices``), closed with it.
"""

from __future__ import annotations

from ...kvm import Device, KvmError, Vm
from . import layout

KVM_DEV_TYPE_ARM_VGIC_V3 = 7
# Attribute groups and attributes (asm/kvm.h).
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION = 5

# KVM_IRQ_LINE's irq field on arm64 (api.rst, 4.25): type, vCPU, INTID.
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_TYPE_SPI = 1


def spi_line(spi: int) -> int:
    """KVM_IRQ_LINE's irq for SPI ``spi``."""
    return KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT | (layout.GIC_SPI_BASE + spi)


def _redist_region_attr(index: int, base: int, cpus: int) -> int:
    """KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION's value: count, base, flags 0, index."""
    return cpus << 52 | base | index


def create(vm: Vm, cpus: int, ram_end: int) -> None:
    """The GICv3 for ``cpus`` vCPUs, one of ``vm.devices``. KvmError if KVM cannot make one."""
    try:
        device = vm.create_device(KVM_DEV_TYPE_ARM_VGIC_V3)
    except KvmError as e:
        raise KvmError(e.errno, f"this host's KVM emulates no GICv3 ({e}); AltoVirt's arm64 board "
                       "needs one") from e
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, layout.GIC_DIST_BASE)
    regions = layout.redist_regions(cpus, ram_end)
    if len(regions) == 1:
        device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, regions[0][0])
    else:
        for index, (base, size) in enumerate(regions):
            value = _redist_region_attr(index, base, size // layout.GIC_REDIST_STRIDE)
            device.set_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION, value)
    device.set_attr(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout.GIC_NR_IRQS)


def device(vm: Vm) -> Device:
    """The GIC :func:`create` made."""
    return next(d for d in vm.devices if d.kind == KVM_DEV_TYPE_ARM_VGIC_V3)


def finalize(vm: Vm) -> None:
    """Initialise the GIC: every vCPU exists and is initialised."""
    device(vm).set_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT)
