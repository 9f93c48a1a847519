"""Build a VM from a VmConfig: open KVM and check what we rely on, lay out guest
RAM, create the devices, load the kernel and set up the vCPUs.

:func:`build` returns a :class:`Machine` ready to run, or raises an
AltoVirtError naming what is wrong, with everything it had made released.
"""

from __future__ import annotations

import functools
import logging

from .. import arch
from ..config import VmConfig
from ..kvm import Kvm, KvmError
from ..memory import GuestMemory
from .device_manager import DeviceManager
from .machine import BootInputs, Machine, VmmError
from .pit import LostTicks
from .vcpu import VcpuThread
from .virtio_devices import MmioSlot

log = logging.getLogger(__name__)


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


def guest_cmdline(user: str, slots: list[MmioSlot]) -> str:
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
    words += (s.cmdline_entry() for s in slots)
    return " ".join(words)


def _read_file(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise VmmError(f"{what}: {path}: {e.strerror}") from e


def _boot_inputs(cfg: VmConfig, cmdline: str, devices: DeviceManager) -> BootInputs:
    """What arch.load_kernel needs: the kernel and initrd read, the command line, and the
    firmware built from what the devices say of themselves."""
    image = _read_file("-kernel", cfg.kernel or "")
    initrd = _read_file("-initrd", cfg.initrd) if cfg.initrd else None
    firmware = arch.build_firmware(cfg.vcpus, devices.firmware_devices())
    return (image, cmdline, initrd, cfg.vcpus, firmware)


def prepare_boot(m: Machine) -> arch.BootPlan:
    """Load the kernel, initrd, command line and boot tables into guest RAM."""
    assert m.mem is not None and m.boot_inputs is not None
    try:
        plan = arch.load_kernel(m.mem, *m.boot_inputs)
    except arch.KernelError as e:
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
        m.mem = mem = GuestMemory(arch.ram_regions(cfg.mem_size), dontdump=cfg.omit_vm_memory,
                                  shared=cfg.mem_share)
    except OSError as e:
        raise VmmError(f"-m: cannot allocate {cfg.mem_size >> 20} MiB of guest RAM: {e.strerror}") from e
    # RAM before the interrupt controllers, as Firecracker does: a memory slot added once the
    # in-kernel LAPIC exists costs KVM some 7 ms (on these hosts), one added before 0.1 ms.
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region))
    try:
        arch.create_irqchip(vm)
    except KvmError as e:
        raise VmmError(f"cannot set up the VM's interrupt controllers: {e}") from e
    m.lost_ticks = LostTicks(vm)

    m.devices = devices = DeviceManager(cfg, vm, mem, m.io, m.block_pool, m.lifecycle.request_stop)
    slots = devices.add_virtio_devices(m.devices_still, m.device_deleted)
    devices.add_legacy_devices()        # before the firmware, which they describe
    m.vmgenid = devices.vmgenid
    cmdline = guest_cmdline(cfg.cmdline, slots)
    m.read_boot_inputs = functools.partial(_boot_inputs, cfg, cmdline, devices)
    plan = None
    if cfg.incoming is None:            # a VM loaded from a snapshot or a migration boots nothing
        m.boot_inputs = m.read_boot_inputs()
        plan = prepare_boot(m)
    if m.vmgenid is not None:
        m.vmgenid.write()

    for i in range(cfg.vcpus):
        m.vcpus.append(VcpuThread(vm.create_vcpu(i), devices.pio, devices.mmio, m.lifecycle.request_stop))
    vcpus = [v.vcpu for v in m.vcpus]
    registers = arch.setup_vcpus(kvm, vcpus)
    if plan is not None:
        arch.setup_boot_regs(vcpus[0], plan)
    try:
        m.power_on = arch.save_state(vm, vcpus, registers)
    except KvmError as e:
        raise VmmError(f"cannot read the vCPUs' power-on state: {e}") from e
