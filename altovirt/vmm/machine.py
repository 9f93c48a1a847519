"""Build a VM from a VmConfig and run it until it stops.

:meth:`Machine.build` opens KVM, checks what we rely on, lays out guest RAM,
loads the kernel, creates the devices and vCPUs; :meth:`Machine.run` starts
the vCPU threads, serves host I/O from the main thread's event loop and
tears everything down when a stop is requested (by the guest, a signal or,
later, QMP).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..arch.x86_64 import acpi, boot, layout, poweron
from ..arch.x86_64.loader import KernelError
from ..arch.x86_64.regs import BOOT_MSRS
from ..config import VmConfig
from ..devices.bus import Bus
from ..devices.legacy.acpi import ACPI_PORT_BASE, ACPI_PORT_COUNT, GED_IRQ, AcpiRegisters
from ..devices.legacy.boottimer import BOOT_TIMER_PORT, BootTimer
from ..devices.legacy.i8042 import DATA_PORT as I8042_PORT
from ..devices.legacy.i8042 import I8042, I8042_IRQ
from ..devices.legacy.post import POST_PORT, PostPort
from ..devices.legacy.rtc import RTC_PORT, Rtc
from ..devices.legacy.serial import COM1_IRQ, COM1_PORT, Serial
from ..devices.virtio.block import WorkerPool
from ..devices.virtio.mmio import MMIO_SLOT_SIZE, QUEUE_NOTIFY, MmioTransport
from ..devices.virtio.vsock import Vsock
from ..errors import EXIT_USAGE, AltoVirtError
from ..eventloop import EventLoop
from ..kvm import Kvm, KvmError, Vcpu
from ..kvm import Vm as KvmVm
from ..kvm import ioctls as K
from ..kvm import structs as S
from ..memory import GuestMemory
from ..sandbox import seccomp
from ..xenstore.store import Store
from . import virtio_devices
from .console import HostConsole
from .hotplug import Hotplug
from .vcpu import GUEST_RESET, GUEST_SHUTDOWN, StopReason, VcpuThread, install_kick_handler

log = logging.getLogger(__name__)

# Where VMX keeps its real-mode TSS and identity map: the top of the 32-bit space,
# below the BIOS, outside RAM (KVM_SET_TSS_ADDR needs three pages).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000


@dataclass(frozen=True)
class VcpuInfo:
    index: int
    thread_id: int
    halted: bool


class StateError(AltoVirtError, RuntimeError):
    """A lifecycle request that makes no sense in the VM's current state."""


class VmmError(AltoVirtError, RuntimeError):
    """The VM cannot be built or run; the message is one line for the user."""


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


class Machine:
    """A built VM. Thread-safe entry points: request_stop, pause, resume."""

    def __init__(self, cfg: VmConfig) -> None:
        self.cfg = cfg
        self.kvm: Kvm | None = None
        self.vm: KvmVm | None = None
        self.mem: GuestMemory | None = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.vcpus: list[VcpuThread] = []
        self.boot_timer = BootTimer()
        self.stop_reason: StopReason | None = None
        self._stop_lock = threading.Lock()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds: list[int] = [self._stop_fd]
        self.console: HostConsole | None = None
        self.serial: Serial | None = None
        self.plan: boot.BootPlan | None = None
        self.io = EventLoop("io", functools.partial(seccomp.confine, "io"))
        self.block_pool = WorkerPool(on_start=functools.partial(seccomp.confine, "io"))
        self.transports: list[MmioTransport] = []
        # Lifecycle (QMP's RunState names): prelaunch -> running <-> paused -> shutdown.
        self.state = "prelaunch"
        self._lifecycle = threading.Lock()
        self._clock: S.kvm_clock_data | None = None
        self._listeners: list[Callable[[str, dict[str, object]], None]] = []
        self.i8042: I8042 | None = None
        self.acpi: AcpiRegisters | None = None
        self.hotplug: Hotplug | None = None
        self.vsock: Vsock | None = None
        # The VM's XenStore: the guest is domain cfg.xen_domid, with its home made at start.
        self.xenstore = Store(cfg.xen_domid) if cfg.xenstore else None
        # What boot.prepare needs after the kernel and initrd files are read, kept for system_reset.
        self._boot_inputs: tuple[bytes, str, bytes | None, int, acpi.AcpiTables | None] | None = None
        self._power_on: poweron.PowerOnState | None = None

    # --- building ---
    @classmethod
    def build(cls, cfg: VmConfig) -> Machine:
        m = cls(cfg)
        try:
            m._build()
        except BaseException:
            m.close()
            raise
        return m

    def _build(self) -> None:
        cfg = self.cfg
        self.kvm = kvm = open_kvm()
        self.vm = vm = kvm.create_vm()
        assert vm is not None
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit2()
        except KvmError as e:
            raise VmmError(f"cannot set up the VM's interrupt controllers: {e}") from e
        try:
            self.mem = mem = GuestMemory(layout.ram_regions(cfg.mem_size), dontdump=cfg.omit_vm_memory)
        except OSError as e:
            raise VmmError(f"-m: cannot allocate {cfg.mem_size >> 20} MiB of guest RAM: "
                           f"{e.strerror}") from e
        for slot, region in enumerate(mem.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region))

        slots = self._add_virtio_devices()
        cmdline = guest_cmdline(cfg.cmdline, slots)
        tables = acpi.build(cfg.vcpus, slots) if cfg.acpi else None
        image = _read_file("-kernel", cfg.kernel or "")
        initrd = _read_file("-initrd", cfg.initrd) if cfg.initrd else None
        self._boot_inputs = (image, cmdline, initrd, cfg.vcpus, tables)
        try:
            self.plan = plan = boot.prepare(mem, *self._boot_inputs)
        except KernelError as e:
            raise VmmError(f"-kernel: {cfg.kernel}: {e}") from e
        log.info("kernel %s: %s format, entry %#x%s", cfg.kernel, plan.kind, plan.entry,
                 f", initrd at {plan.initrd_addr:#x}" if plan.initrd_size else "")

        self._add_legacy_devices()
        supported = kvm.supported_cpuid()
        msrs: dict[int, int] = {}
        for i in range(cfg.vcpus):
            vcpu = vm.create_vcpu(i)
            self.vcpus.append(VcpuThread(vcpu, self.pio, self.mmio, self.request_stop))
            msrs = _set_boot_msrs(vcpu)
            boot.setup_vcpu(vcpu, plan, supported, cfg.vcpus, msrs)
        try:
            self._power_on = poweron.capture(vm, [v.vcpu for v in self.vcpus], list(msrs))
        except KvmError as e:
            raise VmmError(f"cannot read the vCPUs' power-on state: {e}") from e

    def _irqfd(self, gsi: int) -> int:
        """An eventfd that raises an edge on ``gsi`` when written (KVM_IRQFD)."""
        assert self.vm is not None
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self.vm.irqfd(fd, gsi)
        return fd

    def _irq_line(self, gsi: int) -> Callable[[], None]:
        fd = self._irqfd(gsi)
        return lambda: os.eventfd_write(fd, 1)

    def _add_virtio_devices(self) -> list[acpi.MmioSlot]:
        """Create the configured virtio devices; returns the slots they occupy."""
        assert self.vm is not None and self.mem is not None
        slots = []
        try:
            # Hot-plug slots only where something can fill them: QMP.
            devices = virtio_devices.devices_for(self.cfg, self.io, self.block_pool,
                                                 hotplug=bool(self.cfg.api_channel))
        except virtio_devices.DeviceError as e:
            raise VmmError(str(e), exit_status=EXIT_USAGE) from e    # a configuration the host cannot honour
        for index, device in enumerate(devices.in_slot_order()):
            base, irq = virtio_devices.slot(index)
            transport = MmioTransport(device, self.mem, self._irqfd(irq), self.io)
            self.transports.append(transport)
            for q, fd in enumerate(transport.notify_fds):
                self.vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=q)
            self.mmio.insert(transport, base, MMIO_SLOT_SIZE)
            slots.append(acpi.MmioSlot(base, MMIO_SLOT_SIZE, irq))
            log.info("%s: virtio device %d at %#x, IRQ %d", device.name, device.device_id, base, irq)
        self.vsock = next((d for d in devices.others if isinstance(d, Vsock)), None)
        n_disks, n_nics = len(devices.disks), len(devices.nets)
        self.hotplug = Hotplug(self.transports[:n_disks], self.transports[n_disks:n_disks + n_nics],
                               self.io, self.block_pool, self._devices_still, self._device_deleted)
        return slots

    def _add_legacy_devices(self) -> None:
        out = None
        if self.cfg.serial_stdio:
            self.console = HostConsole(self.request_stop)
            out = self.console.write
        self.serial = Serial(out, self._irq_line(COM1_IRQ))
        if self.console:
            self.console.attach(self.serial.enqueue)
        mem = self.mem
        assert mem is not None
        high = sum(r.size for r in mem.regions[1:])
        # COM1's eighth port (scratch, 0x3ff) is the boot timer.
        self.pio.insert(self.serial, COM1_PORT, BOOT_TIMER_PORT - COM1_PORT)
        self.i8042 = I8042(lambda: self.request_stop(GUEST_RESET), self._irq_line(I8042_IRQ))
        self.pio.insert(self.i8042, I8042_PORT, 5)
        if self.cfg.acpi:
            self.acpi = AcpiRegisters(lambda: self.request_stop(GUEST_SHUTDOWN),
                                      lambda: self.request_stop(GUEST_RESET), self._irq_line(GED_IRQ))
            self.pio.insert(self.acpi, ACPI_PORT_BASE, ACPI_PORT_COUNT)
        self.pio.insert(Rtc(mem.regions[0].size, high), RTC_PORT, 2)
        self.pio.insert(self.boot_timer, BOOT_TIMER_PORT, 1)
        self.pio.insert(PostPort(), POST_PORT, 1)

    # --- lifecycle ---
    def add_event_listener(self, listener: Callable[[str, dict[str, object]], None]) -> None:
        """``listener(event, data)`` is called for STOP, RESUME, SHUTDOWN, RESET, POWERDOWN
        and DEVICE_DELETED."""
        self._listeners.append(listener)

    def _emit(self, event: str, data: dict[str, object]) -> None:
        for listener in self._listeners:
            listener(event, data)

    def request_stop(self, reason: StopReason) -> None:
        """Ask the main loop to stop the VM; the first reason given wins (and is announced)."""
        with self._stop_lock:
            first = self.stop_reason is None
            if first:
                self.stop_reason = reason
                self.state = "shutdown"
                log.info("stopping: %s", reason.reason)
        if first:
            self._emit("SHUTDOWN", {"guest": reason.guest, "reason": reason.reason})
        os.eventfd_write(self._stop_fd, 1)

    def pause(self) -> None:
        """Stop the guest: every vCPU out of KVM_RUN, device work quiescent, the clock held."""
        with self._lifecycle:
            if self.state != "running":
                raise StateError(f"the VM is {self.state}, not running")
            for v in self.vcpus:
                v.pause()
            self.io.pause()
            for t in self.transports:
                t.device.quiesce()
            assert self.vm is not None
            self._clock = self.vm.get_clock()
            self.state = "paused"
        self._emit("STOP", {})

    def resume(self) -> None:
        with self._lifecycle:
            if self.state != "paused":
                raise StateError(f"the VM is {self.state}, not paused")
            assert self.vm is not None and self._clock is not None
            # The guest's kvmclock continues from where it stopped: no jump over the pause.
            self.vm.set_clock(S.kvm_clock_data(clock=self._clock.clock))
            self.io.resume()
            for v in self.vcpus:
                v.resume()
            self.state = "running"
        self._emit("RESUME", {})

    def reset(self) -> None:
        """Reset the machine as its reset line would (QMP system_reset): every virtio
        device reset, RAM cleared and the kernel loaded again, vCPUs and interrupt
        controllers back at power-on. A paused VM stays paused; RESET is announced."""
        with self._lifecycle:
            if self.state not in ("running", "paused"):
                raise StateError(f"the VM is {self.state}")
            assert self.vm is not None and self.mem is not None
            assert self._boot_inputs is not None and self._power_on is not None
            with self._held(vcpus=True, devices=True):
                for t in self.transports:
                    t.reset()       # before RAM goes: no device writes into it afterwards
                self.mem.discard()
                boot.prepare(self.mem, *self._boot_inputs)
                poweron.restore(self.vm, [v.vcpu for v in self.vcpus], self._power_on)
        log.info("system reset")
        self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def powerdown(self) -> None:
        """Ask the guest to shut down: the ACPI power button, or without ACPI
        Ctrl-Alt-Del on the keyboard (as Firecracker does)."""
        if self.state not in ("running", "paused"):
            raise StateError(f"the VM is {self.state}")
        if self.acpi is not None:
            self.acpi.press_power_button()
        else:
            assert self.i8042 is not None
            self.i8042.ctrl_alt_del()
        self._emit("POWERDOWN", {})

    @contextlib.contextmanager
    def _held(self, *, vcpus: bool, devices: bool) -> Iterator[None]:
        """Keep the vCPUs and/or device work still for the block, if the VM is running
        (otherwise they are still already). The caller holds the lifecycle lock."""
        running = self.state == "running"
        if running and vcpus:
            for v in self.vcpus:
                v.pause()
        if running and devices:
            self.io.pause()
        try:
            yield
        finally:
            if running and devices:
                self.io.resume()
            if running and vcpus:
                for v in self.vcpus:
                    v.resume()

    @contextlib.contextmanager
    def _devices_still(self) -> Iterator[None]:
        """Hold device work still (a slot is changing), whether the guest runs or not."""
        with self._lifecycle:
            if self.state == "shutdown":
                raise StateError("the VM is shutting down")
            with self._held(vcpus=False, devices=True):
                yield

    def _device_deleted(self, name: str) -> None:
        self._emit("DEVICE_DELETED", {"device": name, "path": name})

    def vcpu_info(self) -> list[VcpuInfo]:
        """Per vCPU: index, native thread id and whether it is halted (read outside KVM_RUN)."""
        with self._lifecycle, self._held(vcpus=True, devices=False):
            return [VcpuInfo(v.index, v.thread_id, v.vcpu.get_mp_state() != K.KVM_MP_STATE_RUNNABLE)
                    for v in self.vcpus]

    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_stop(StopReason("host-signal", False, 128 + signum))

    def run(self, on_running: Callable[[], None] | None = None) -> StopReason:
        """Run until stopped; returns why. Must be called on the main thread."""
        install_kick_handler()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        loop = EventLoop("main", functools.partial(seccomp.confine, "main"))
        loop.add(self._stop_fd, loop.stop_soon)     # request_stop() sets stop_reason, then writes it
        try:
            if self.console:
                self.console.start(loop)
            self.io.start()
            if self.hotplug is not None and self.hotplug.disks:
                self.block_pool.start()         # only a VM with disk slots needs it
            for v in self.vcpus:
                v.start()
            with self._lifecycle:
                if self.state == "prelaunch":
                    self.state = "running"
            if on_running:
                on_running()
            loop.run()
        finally:
            for v in self.vcpus:
                v.resume()
                v.exit()
            self.io.resume()
            self.io.stop()
            if self.console:
                self.console.stop()
            loop.stop()
            for s, h in old.items():
                signal.signal(s, h)
        assert self.stop_reason is not None
        return self.stop_reason

    def close(self) -> None:
        """Release every fd and mapping; safe after a partial build."""
        for v in self.vcpus:
            v.vcpu.close()
        self.vcpus.clear()
        for t in self.transports:
            t.close()
        self.transports.clear()
        self.block_pool.stop()
        if self.hotplug is not None:
            self.hotplug.close()
        self.io.stop()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
