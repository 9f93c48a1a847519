"""aarch64 as the architecture interface (:mod:`altovirt.arch`) names it: QEMU virt's memory
map, KVM's in-kernel GICv3, architected timer and PSCI, booted as Linux's arm64 ``Image``
with a flattened device tree.

The modules do the work: ``layout`` (the memory map, the virtio-mmio slots), ``boot`` (the
kernel, initrd and device tree in RAM), ``fdt`` (the device tree), ``gic``, ``regs`` and
``cpu_templates`` (the interrupt controller and the vCPUs), ``poweron`` (KVM's state). Here are the names the
interface exports, and the steps that only tie those modules together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...config.model import CpuTemplate, CpuTemplateSpec
from ...kvm import Kvm, KvmError, Vcpu, Vm
from ..board import BoardDevice, PciLayout
from . import cpu_templates, gic, layout, regs
from .boot import BootPlan, Firmware, KernelError, mpidr
from .boot import prepare as load_kernel
from .layout import POWER_BUTTON_LINE, mmio_slot, pci_layout, ram_regions
from .poweron import PowerOnState, check_cpu, host_cpu, snapshot_registers
from .poweron import restore as restore_state
from .poweron import save as save_state

__all__ = [
    "BOARD",
    "POWER_BUTTON_LINE",
    "REQUIRED_CAPS",
    "VMGENID_ADDR",
    "BootPlan",
    "Firmware",
    "FirmwareDevices",
    "KernelError",
    "PowerOnState",
    "build_firmware",
    "check_cpu",
    "cpu_template",
    "create_irqchip",
    "host_cpu",
    "irqchip_routes",
    "load_kernel",
    "mmio_slot",
    "pci_layout",
    "ram_regions",
    "read_clock",
    "restore_state",
    "save_state",
    "setup_boot_regs",
    "setup_vcpus",
    "snapshot_registers",
    "write_clock",
]

REQUIRED_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_ONE_REG", "KVM_CAP_DEVICE_CTRL",
                 "KVM_CAP_ARM_PSCI_0_2", "KVM_CAP_MP_STATE", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQFD",
                 "KVM_CAP_IOEVENTFD", "KVM_CAP_IMMEDIATE_EXIT")
# No VM generation ID: it is an ACPI device, and this machine describes itself in a device tree.
VMGENID_ADDR = None

BOARD = {
    "uart": BoardDevice(layout.UART_BASE, layout.PL0X1_SIZE, gic.spi_line(layout.UART_SPI)),
    "rtc": BoardDevice(layout.RTC_BASE, layout.PL0X1_SIZE),
    "gpio": BoardDevice(layout.GPIO_BASE, layout.PL0X1_SIZE, gic.spi_line(layout.GPIO_SPI)),
    "boot-timer": BoardDevice(layout.BOOT_TIMER_BASE, 4),
}


@dataclass(frozen=True)
class FirmwareDevices:
    """What the devices hand the firmware: the virtio-mmio slots in use, (base, SPI) each, or
    the PCIe host bridge. The UART and RTC are always there, at the layout's addresses."""

    virtio: Sequence[tuple[int, int]]
    pci: PciLayout | None = None


def build_firmware(cpus: int, devices: FirmwareDevices, irqchip: gic.Gic) -> Firmware:
    return Firmware(tuple(devices.virtio), irqchip, devices.pci)


def read_clock(vm: Vm, vcpus: Sequence[Vcpu]) -> int:
    """The guest's clock (its virtual counter, CNTVCT_EL0), to hold across a pause."""
    return vcpus[0].get_one_reg(regs.KVM_REG_ARM_TIMER_CNT)


def write_clock(vm: Vm, vcpus: Sequence[Vcpu], value: int) -> None:
    """The virtual counter set back to ``value`` on every vCPU, as QEMU does on resume
    (kvm_arm_put_virtual_time): the guest sees no jump over the pause."""
    for vcpu in vcpus:
        vcpu.set_one_reg(regs.KVM_REG_ARM_TIMER_CNT, value)


def create_irqchip(vm: Vm, cpus: int, ram_end: int, *, pci: bool = False) -> gic.Gic:
    """The in-kernel GIC for ``cpus`` vCPUs (the architected timer needs nothing), with an
    ITS for ``pci``'s MSIs: after guest RAM is registered, before any vCPU; returns what the
    device tree will describe. KvmError if KVM refuses."""
    return gic.create(vm, cpus, ram_end, its=pci)


def cpu_template(spec: CpuTemplateSpec, kvm: Kvm) -> CpuTemplate:
    """The template a VM starts with (see :func:`.cpu_templates.resolve`)."""
    return cpu_templates.resolve(spec)


def setup_vcpus(kvm: Kvm, vcpus: Sequence[Vcpu], template: CpuTemplate) -> list[int]:
    """Initialise every vCPU (with ``template``'s features and registers), then the GIC, which
    needs them all; returns the registers the power-on state keeps: none, as a reset
    initialises the vCPUs again."""
    regs.init_vcpus(vcpus, template.vcpu_features)
    cpu_templates.apply_registers(vcpus, template)
    mpidrs = regs.mpidrs(vcpus)
    expected = [mpidr(i) for i in range(len(vcpus))]
    if mpidrs != expected:          # the device tree, written before the vCPUs existed, names these
        raise KvmError(f"KVM gave the vCPUs MPIDRs {mpidrs[:4]}..., not {expected[:4]}...")
    if vcpus:
        gic.finalize(vcpus[0].vm)
    return []


def setup_boot_regs(vcpu: Vcpu, plan: BootPlan) -> None:
    """The boot vCPU at the kernel's entry (the others wait, powered off, for PSCI CPU_ON)."""
    regs.setup_boot_regs(vcpu, plan.entry, plan.fdt_addr)


def irqchip_routes() -> list[tuple[int, int, int]]:
    """KVM's default routes on arm64 (vgic-irqfd.c): GSI n to the GIC's SPI n."""
    return [(spi, 0, spi) for spi in range(layout.GIC_NR_IRQS - layout.GIC_SPI_BASE)]
