"""Build a VM from a VmConfig, or from a snapshot (its configuration, then its memory
and state): open KVM and check what we rely on, lay out guest RAM, create the devices,
load the kernel or the snapshot and set up the vCPUs.

:func:`build` returns a :class:`Machine` ready to run, or raises an
AltoVirtError naming what is wrong, with everything it had made released.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import arch
from ..config import VmConfig
from ..config.model import CpuTemplate
from ..devices.virtio.block import WorkerPool
from ..errors import VmmError
from ..eventloop import EventLoop
from ..kvm import Kvm, KvmError
from ..kvm import ioctls as K
from ..memory import GuestMemory
from ..sandbox import seccomp
from .boot import Boot, BootInputs
from .device_manager import DeviceManager
from .lifecycle import Lifecycle, device_deleted, devices_still
from .machine import Machine
from .pit import LostTicks
from .vcpu import VcpuThread
from .virtio_devices import MmioSlot

if TYPE_CHECKING:
    from .actions import Action, Migrations
    from .snapshot import SavedVm

log = logging.getLogger(__name__)


def open_kvm(path: str = "/dev/kvm", capabilities: Sequence[int] = ()) -> Kvm:
    """KVM, with every capability the machine relies on; ``capabilities``: a CPU template's
    changes to those (KVM_CAP_* numbers to need as well, and ``~cap`` to do without)."""
    try:
        kvm = Kvm(path)
    except FileNotFoundError as e:
        raise VmmError(f"{path}: no such device; KVM is not available on this host") from e
    except PermissionError as e:
        raise VmmError(f"{path}: permission denied; run as root or join the kvm group") from e
    except OSError as e:
        raise VmmError(f"{path}: {e.strerror or e}") from e
    dropped = {~c for c in capabilities if c < 0}
    missing = [name for name in arch.REQUIRED_CAPS if getattr(K, name) not in dropped]
    missing = kvm.missing_caps(missing)
    extra = [c for c in capabilities if c >= 0 and kvm.check_extension(c) <= 0]
    if missing or extra:
        kvm.close()
        if not missing:         # the template's own: Firecracker's words
            raise VmmError(f"Kvm error: Missing KVM capabilities: {extra[0]:#x}")
        raise VmmError(f"KVM lacks capability {missing[0]}, which AltoVirt needs"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return kvm


def guest_cmdline(user: str, slots: list[MmioSlot], pci: bool = False) -> str:
    """The user's kernel command line, then what the machine adds to it.

    Unless the user chose a ``pci=`` setting: ``pci=off`` on a machine without PCI, where
    Linux would still read configuration space through ports 0xCF8/0xCFC (on AMD its GART
    aperture check walks all 256 buses, twice), some 33,000 exits to the VMM a boot, as
    Firecracker adds it too; and ``pci=noearly`` on a PCI machine, which spares the same
    early walk (it looks for physical chipsets' quirks) and leaves the ACPI-described bus
    to the PCI core. Then a ``virtio_mmio.device=`` entry per slot: minimal kernels find the
    devices there, distro kernels in the DSDT, so both ways stay. An arm64 guest finds
    everything in its device tree: its command line is the user's.
    """
    if arch.MACHINE == "aarch64":
        return user
    words = [user] if user else []
    if not any(w.startswith("pci=") for w in user.split()):
        words.append("pci=noearly" if pci else "pci=off")
    words += (s.cmdline_entry() for s in slots)
    return " ".join(words)


def _read_file(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise VmmError(f"{what}: {path}: {e.strerror}") from e


def _boot_inputs(cfg: VmConfig, cmdline: str, devices: DeviceManager, irqchip: object) -> BootInputs:
    """What arch.load_kernel needs: the kernel and initrd read, the command line, and the
    firmware built from what the devices say of themselves and the interrupt controllers."""
    image = _read_file("-kernel", cfg.kernel or "")
    initrd = _read_file("-initrd", cfg.initrd) if cfg.initrd else None
    firmware = arch.build_firmware(cfg.vcpus, devices.firmware_devices(), irqchip)
    return (image, cmdline, initrd, cfg.vcpus, firmware)


def _handle(m: Machine, action: Action) -> object:
    """Carry out ``action`` (controller.py), imported with the first request: a VM nothing asks
    anything of never loads the actions (start-up)."""
    from . import controller
    return controller.handle(m, action)


def _migrations(m: Machine) -> Migrations:
    """The migration service of a VM that can migrate (imported only for one)."""
    from .migration import Migration
    return Migration(m)


def build(cfg: VmConfig, *, migratable: bool = False, saved: SavedVm | None = None,
          mem: GuestMemory | None = None) -> Machine:
    """The VM ``cfg`` describes, every part made (and released again if one cannot be).
    ``migratable``: it can be snapshotted and migrated. ``saved``: the VM is the one that
    snapshot holds (``cfg`` is its configuration), paused, not booted; SnapshotError if
    the snapshot does not fit. ``mem``: the saved VM's RAM, in place already (a fork's)."""
    with contextlib.ExitStack() as undo:
        spec = cfg.cpu_template
        kvm = open_kvm(capabilities=spec.kvm_capabilities if isinstance(spec, CpuTemplate) else ())
        undo.callback(kvm.close)
        template = arch.cpu_template(spec, kvm)
        vm = kvm.create_vm()
        undo.callback(vm.close)
        try:
            mem = mem or GuestMemory(arch.ram_regions(cfg.mem_size), dontdump=cfg.omit_vm_memory,
                                     shared=cfg.mem_share)
        except OSError as e:
            raise VmmError(f"-m: cannot allocate {cfg.mem_size >> 20} MiB of guest RAM: {e.strerror}") from e
        undo.callback(mem.close)
        # RAM before the interrupt controllers, as Firecracker does: a memory slot added once the
        # in-kernel LAPIC exists costs KVM some 7 ms (on these hosts), one added before 0.1 ms.
        for slot, region in enumerate(mem.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region))
        try:
            irqchip = arch.create_irqchip(vm, cfg.vcpus, mem.regions[-1].end, pci=cfg.pci)
        except KvmError as e:
            raise VmmError(f"cannot set up the VM's interrupt controllers: {e}") from e
        lost_ticks = LostTicks(vm)
        undo.callback(lost_ticks.close)
        lifecycle = Lifecycle()
        undo.callback(lifecycle.close)
        io = EventLoop("io", functools.partial(seccomp.confine, "io"))
        undo.callback(io.stop)
        block_pool = WorkerPool(on_start=functools.partial(seccomp.confine, "io"))
        undo.callback(block_pool.stop)
        xenstore = None
        if cfg.xenstore:
            from ..xenstore.store import Store  # only a VM with a XenStore imports it
            xenstore = Store(cfg.xen_domid)

        devices = DeviceManager(cfg, vm, mem, io, block_pool, lifecycle.request_stop, lifecycle.emit)
        undo.callback(devices.close)
        # The vCPUs before the devices: an arm64 GIC is ready for the devices' irqfds only
        # once every vCPU is (KVM_IRQFD fails with EAGAIN before).
        vcpus = [VcpuThread(vm.create_vcpu(i), devices.pio, devices.mmio, lifecycle.request_stop,
                            cfg.vcpu_thread_name) for i in range(cfg.vcpus)]
        for v in vcpus:
            undo.callback(v.vcpu.close)
        registers = arch.setup_vcpus(kvm, [v.vcpu for v in vcpus], template)

        slots = devices.add_virtio_devices(functools.partial(devices_still, lifecycle, io),
                                           functools.partial(device_deleted, lifecycle))
        if xenstore is not None and devices.mmds is not None:
            from ..xenstore.mmds import mirror  # only a VM with both
            mirror(xenstore, devices.mmds)
        devices.add_legacy_devices()        # before the firmware, which they describe
        cmdline = guest_cmdline(cfg.cmdline, slots, cfg.pci)
        boot = Boot(cfg.kernel or "", functools.partial(_boot_inputs, cfg, cmdline, devices, irqchip))
        # A VM loaded from a snapshot or a migration boots nothing (it reads its kernel to reboot).
        plan = boot.load(mem) if cfg.incoming is None and saved is None else None
        if devices.vmgenid is not None:
            devices.vmgenid.write()
        if plan is not None:
            arch.setup_boot_regs(vcpus[0].vcpu, plan)
        try:
            power_on = arch.save_state(vm, [v.vcpu for v in vcpus], registers)
        except KvmError as e:
            raise VmmError(f"cannot read the vCPUs' power-on state: {e}") from e
        machine = Machine(cfg, kvm=kvm, vm=vm, mem=mem, lifecycle=lifecycle, io=io, block_pool=block_pool,
                          devices=devices, vcpus=vcpus, boot=boot, power_on=power_on, lost_ticks=lost_ticks,
                          xenstore=xenstore, handle=_handle, migrations=_migrations if migratable else None)
        undo.pop_all()
    if saved is not None:
        from . import snapshot
        try:
            snapshot.build_from(machine, saved)
        except BaseException:
            machine.close()             # it holds part of the state: it must not run
            raise
    return machine
