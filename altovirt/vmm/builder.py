"""Build a VM from a VmConfig: open KVM and check what we rely on, lay out guest
RAM, create the devices, load the kernel and set up the vCPUs.

:func:`build` returns a :class:`Machine` ready to run, or raises an
AltoVirtError naming what is wrong, with everything it had made released.
"""

from __future__ import annotations

import functools
import logging

from ..arch.x86_64 import acpi, boot, layout, poweron
from ..arch.x86_64.loader import KernelError
from ..arch.x86_64.regs import BOOT_MSRS
from ..config import VmConfig
from ..devices.legacy.vmgenid import VmGenId
from ..kvm import Kvm, KvmError, Vcpu
from ..memory import GuestMemory
from . import virtio_devices
from .device_manager import DeviceManager
from .machine import BootInputs, Machine, VmmError
from .pit import LostTicks
from .vcpu import VcpuThread

log = logging.getLogger(__name__)

# Where VMX keeps its real-mode TSS and identity map: the top of the 32-bit space,
# below the BIOS, outside RAM (KVM_SET_TSS_ADDR needs three pages).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000


def open_kvm(path: str = "/dev/kvm") -> Kvm:
    try:
        kvm = Kvm(path)
    except FileNotFoundError as e:
        raise VmmError(f"{path}: no such device; KVM is not available on this host") from e
    except PermissionError as e:
        raise VmmError(f"{path}: permission denied; run as root or join the kvm group") from e
    except OSError as e:
        raise VmmError(f"{path}: {e.strerror or e}") from e
    missing = kvm.missing_caps()
    if missing:
        kvm.close()
        raise VmmError(f"KVM lacks capability {missing[0]}, which AltoVirt needs"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return kvm


def guest_cmdline(user: str, slots: list[acpi.MmioSlot]) -> str:
    """The user's kernel command line, then what the machine adds to it.

    ``pci=off`` unless the user chose a ``pci=`` setting: there is no PCI bus, yet
    Linux reads config space through ports 0xCF8/0xCFC (on AMD its GART aperture
    check walks all 256 buses, twice), some 33,000 exits to the VMM a boot.
    Firecracker adds it too. Then a ``virtio_mmio.device=`` entry per slot: minimal
    kernels find the devices there, distro kernels in the DSDT, so both ways stay.
    """
    words = [user] if user else []
    if not any(w.startswith("pci=") for w in user.split()):
        words.append("pci=off")
    words += (virtio_devices.cmdline_entry(s.base, s.irq) for s in slots)
    return " ".join(words)


def _read_file(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise VmmError(f"{what}: {path}: {e.strerror}") from e


def _set_boot_msrs(vcpu: Vcpu) -> dict[int, int]:
    """Set the boot MSRs; a host (PVM) that refuses some keeps its defaults for those."""
    try:
        vcpu.set_msrs(BOOT_MSRS)
        return BOOT_MSRS
    except KvmError:
        accepted = {}
        for index, value in BOOT_MSRS.items():
            try:
                vcpu.set_msrs({index: value})
                accepted[index] = value
            except KvmError:
                log.debug("host refuses boot MSR %#x; left at its default", index)
        return accepted


def _boot_inputs(cfg: VmConfig, cmdline: str, slots: list[acpi.MmioSlot]) -> BootInputs:
    """What boot.prepare needs: the kernel and initrd read, the command line and tables."""
    image = _read_file("-kernel", cfg.kernel or "")
    initrd = _read_file("-initrd", cfg.initrd) if cfg.initrd else None
    tables = acpi.build(cfg.vcpus, slots) if cfg.acpi else None
    return (image, cmdline, initrd, cfg.vcpus, tables)


def prepare_boot(m: Machine) -> boot.BootPlan:
    """Load the kernel, initrd, command line and boot tables into guest RAM."""
    assert m.mem is not None and m.boot_inputs is not None
    try:
        plan = boot.prepare(m.mem, *m.boot_inputs)
    except KernelError as e:
        raise VmmError(f"-kernel: {m.cfg.kernel}: {e}") from e
    log.info("kernel %s: %s format, entry %#x%s", m.cfg.kernel, plan.kind, plan.entry,
             f", initrd at {plan.initrd_addr:#x}" if plan.initrd_size else "")
    return plan


def build(cfg: VmConfig) -> Machine:
    m = Machine(cfg)
    try:
        _build(m)
    except BaseException:
        m.close()
        raise
    return m


def _build(m: Machine) -> None:
    cfg = m.cfg
    m.kvm = kvm = open_kvm()
    m.vm = vm = kvm.create_vm()
    try:
        m.mem = mem = GuestMemory(layout.ram_regions(cfg.mem_size), dontdump=cfg.omit_vm_memory,
                                  shared=cfg.mem_share)
    except OSError as e:
        raise VmmError(f"-m: cannot allocate {cfg.mem_size >> 20} MiB of guest RAM: {e.strerror}") from e
    # RAM before the interrupt controllers, as Firecracker does: a memory slot added once the
    # in-kernel LAPIC exists costs KVM some 7 ms (on these hosts), one added before 0.1 ms.
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region))
    try:
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
    except KvmError as e:
        raise VmmError(f"cannot set up the VM's interrupt controllers: {e}") from e
    m.lost_ticks = LostTicks(vm)

    m.devices = devices = DeviceManager(cfg, vm, mem, m.io, m.block_pool, m.lifecycle.request_stop)
    slots = devices.add_virtio_devices(m.devices_still, m.device_deleted)
    cmdline = guest_cmdline(cfg.cmdline, slots)
    m.read_boot_inputs = functools.partial(_boot_inputs, cfg, cmdline, slots)
    plan = None
    if cfg.incoming is None:            # a VM loaded from a snapshot or a migration boots nothing
        m.boot_inputs = m.read_boot_inputs()
        plan = prepare_boot(m)

    devices.add_legacy_devices()
    if devices.acpi is not None:
        m.vmgenid = VmGenId(mem, layout.VMGENID_ADDR, devices.acpi.vm_generation_changed)
        m.vmgenid.write()
    supported = kvm.supported_cpuid()
    msrs: dict[int, int] = {}
    for i in range(cfg.vcpus):
        vcpu = vm.create_vcpu(i)
        m.vcpus.append(VcpuThread(vcpu, devices.pio, devices.mmio, m.lifecycle.request_stop))
        msrs = _set_boot_msrs(vcpu)
        boot.setup_vcpu(vcpu, supported, cfg.vcpus, msrs)
    if plan is not None:
        boot.setup_boot_regs(m.vcpus[0].vcpu, plan)
    try:
        m.power_on = poweron.save(vm, [v.vcpu for v in m.vcpus], list(msrs))
    except KvmError as e:
        raise VmmError(f"cannot read the vCPUs' power-on state: {e}") from e
