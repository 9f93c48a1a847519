"""x86_64 as the architecture interface (:mod:`altovirt.arch`) names it: a PC-like
micro-VM with KVM's in-kernel PIC, IOAPIC, LAPICs and PIT, booted through Linux's
64-bit or PVH protocol with an MP table and hardware-reduced ACPI.

The modules do the work: ``layout`` (the memory map, the virtio-mmio slots),
``loader`` and ``boot`` (the kernel and its boot structures), ``acpi`` and
``mptable`` (the firmware tables), ``cpuid``, ``cpu_templates`` and ``regs`` (the vCPUs), ``poweron``
(KVM's state). Here are the names the interface exports, and the steps that only
tie those modules together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ...acpi.tables import PowerRegisters, ResetRegister
from ...config.model import CpuTemplate, CpuTemplateSpec
from ...kvm import Kvm, Vcpu, Vm
from ...kvm import structs as S
from ..board import BoardDevice
from . import acpi, layout
from .boot import BootPlan, Firmware, setup_boot_regs, setup_vcpus
from .boot import prepare as load_kernel
from .cpu_templates import resolve as _resolve_template
from .cpuid import check_cpu, host_cpu
from .layout import VMGENID_ADDR, mmio_slot, pci_layout, ram_regions
from .loader import KernelError
from .poweron import PowerOnState
from .poweron import restore as restore_state
from .poweron import save as save_state
from .poweron import snapshot_msrs as snapshot_registers

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

# A PC's own devices are on port I/O, where the devices' modules say (COM1, the i8042, ...).
BOARD: dict[str, BoardDevice] = {}
POWER_BUTTON_LINE: int | None = None       # the power button is ACPI's
# The KVM capabilities this machine relies on (<linux/kvm.h> KVM_CAP_* names).
REQUIRED_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_EXT_CPUID",
                 "KVM_CAP_MP_STATE", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQFD", "KVM_CAP_PIT2",
                 "KVM_CAP_IOEVENTFD", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_XSAVE",
                 "KVM_CAP_XCRS", "KVM_CAP_IMMEDIATE_EXIT")


@dataclass(frozen=True)
class FirmwareDevices:
    """What the devices hand the firmware, each describing itself."""

    dsdt: Sequence[bytes]           # Device terms for the DSDT's \_SB, in the order it lists them
    power: PowerRegisters | None    # the ACPI registers; None: no ACPI tables (-machine acpi=off)
    boot_flags: int                 # the IA-PC boot flags they ask the FADT for (ACPI 6.4, 5.2.9.3)
    reset: ResetRegister            # how the reset vector's stub resets (the i8042's reset line)
    pci: bool = False               # a PCIe host bridge is there (layout's PCI windows and ECAM)
    tables: Mapping[str, bytes] = field(default_factory=dict)   # more ACPI tables by signature (MCFG)


def build_firmware(cpus: int, devices: FirmwareDevices, irqchip: object = None) -> Firmware:
    """The firmware for ``cpus`` vCPUs and ``devices`` (the MADT names the interrupt controllers
    there always are: ``irqchip`` says nothing more): built only to boot (a VM that loads
    its state from a snapshot needs none until it resets). ValueError if the ACPI tables
    outgrow their area."""
    tables = None if devices.power is None else acpi.build(cpus, devices.dsdt, devices.power,
                                                           devices.boot_flags, devices.tables)
    return Firmware(tables, devices.reset, devices.pci)


def cpu_template(spec: CpuTemplateSpec, kvm: Kvm) -> CpuTemplate:
    """The template a VM starts with (see :func:`.cpu_templates.resolve`)."""
    return _resolve_template(spec, kvm.supported_cpuid())


def read_clock(vm: Vm, vcpus: Sequence[Vcpu]) -> int:
    """The guest's clock (the kvmclock, in ns), to hold across a pause."""
    return vm.get_clock().clock


def write_clock(vm: Vm, vcpus: Sequence[Vcpu], value: int) -> None:
    """The guest's clock set back to ``value`` (what :func:`read_clock` said): no jump."""
    vm.set_clock(S.kvm_clock_data(clock=value))


def create_irqchip(vm: Vm, cpus: int, ram_end: int, *, pci: bool = False) -> object:
    """The in-kernel PIC, IOAPIC and PIT (the LAPICs come with the vCPUs), and first the pages
    VMX needs for real mode: after guest RAM is registered, before any vCPU. KvmError if KVM
    refuses. Returns None: a PC's are always these, which the firmware knows (PCI's MSIs
    need nothing more)."""
    vm.set_tss_addr(layout.TSS_ADDR)
    vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    vm.create_irqchip()
    vm.create_pit2()
    return None


IOAPIC_PINS, PIC_PINS = 24, 16      # what KVM routes by default (virt/kvm/irqchip.c, x86's irq_comm.c)


def irqchip_routes() -> list[tuple[int, int, int]]:
    """KVM's default routes: each IOAPIC pin, and the PICs' below 16."""
    from ...kvm import ioctls as K
    routes = [(gsi, K.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(IOAPIC_PINS)]
    routes += [(gsi, K.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else K.KVM_IRQCHIP_PIC_SLAVE, gsi % 8)
               for gsi in range(PIC_PINS)]
    return routes
