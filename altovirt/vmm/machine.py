"""A built VM, run until it stops: the vCPU threads, the device event loop, the
main thread's loop, and the lifecycle operations QMP asks for.

:func:`altovirt.vmm.builder.build` makes a Machine; :meth:`Machine.run`
starts the vCPU threads, serves the host console and the stop eventfd on the
main thread and tears everything down when a stop is requested (by the guest,
a signal or QMP).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import arch
from ..config import VmConfig
from ..devices.legacy.vmgenid import VmGenId
from ..devices.virtio.block import WorkerPool
from ..devices.virtio.device import DeviceBusyError
from ..devices.virtio.vsock import Vsock
from ..errors import AltoVirtError
from ..eventloop import EventLoop
from ..kvm import Kvm
from ..kvm import Vm as KvmVm
from ..kvm import ioctls as K
from ..kvm import structs as S
from ..memory import GuestMemory
from ..sandbox import seccomp
from . import controller
from .actions import Action, ActionQueue
from .device_manager import DeviceManager
from .hotplug import Hotplug, HotplugError
from .lifecycle import Lifecycle, Listener, RunState, StateError
from .vcpu import StopReason, VcpuThread, install_kick_handler

if TYPE_CHECKING:
    from ..snapshot.format import Section
    from ..xenstore.store import Store
    from .migration import Migration
    from .pit import LostTicks

log = logging.getLogger(__name__)

# What arch.load_kernel needs once the kernel and initrd are read: kept for system_reset.
BootInputs = tuple[bytes, str, bytes | None, int, arch.Firmware]


@dataclass(frozen=True)
class VcpuInfo:
    index: int
    thread_id: int
    halted: bool


class VmmError(AltoVirtError, RuntimeError):
    """The VM cannot be built or run; the message is one line for the user."""


class Machine:
    """A built VM. Thread-safe entry points: request_stop, pause, resume, reset, powerdown."""

    def __init__(self, cfg: VmConfig) -> None:
        self.cfg = cfg
        self.kvm: Kvm | None = None
        self.vm: KvmVm | None = None
        self.mem: GuestMemory | None = None
        self.devices: DeviceManager | None = None
        self.vcpus: list[VcpuThread] = []
        self.io = EventLoop("io", functools.partial(seccomp.confine, "io"))
        self.block_pool = WorkerPool(on_start=functools.partial(seccomp.confine, "io"))
        self.lifecycle = Lifecycle()
        self._loop = EventLoop("main", functools.partial(seccomp.confine, "main"))
        self._actions = ActionQueue(self._loop)
        # The VM's XenStore: the guest is domain cfg.xen_domid, with its home made at start.
        self.xenstore: Store | None = None
        if cfg.xenstore:
            from ..xenstore.store import Store  # only a VM with a XenStore imports it
            self.xenstore = Store(cfg.xen_domid)
        self.boot_inputs: BootInputs | None = None     # read at build, or at the first reset if loaded
        self.read_boot_inputs: Callable[[], BootInputs] | None = None
        self.power_on: arch.PowerOnState | None = None
        self._clock: S.kvm_clock_data | None = None
        self._snapshot_msrs: list[int] | None = None
        # QEMU's autostart: 'cont' while the state loads (inmigrate) runs the VM once it is in.
        self._run_once_loaded = False
        self.migration: Migration | None = None        # with a QMP channel or -incoming
        self.vmgenid: VmGenId | None = None             # with ACPI
        self.lost_ticks: LostTicks | None = None

    # --- what the API and the CLI see ---
    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def stop_reason(self) -> StopReason | None:
        return self.lifecycle.stop_reason

    @property
    def hotplug(self) -> Hotplug | None:
        return self.devices.hotplug if self.devices else None

    @property
    def vsock(self) -> Vsock | None:
        return self.devices.vsock if self.devices else None

    def add_event_listener(self, listener: Listener) -> None:
        self.lifecycle.add_listener(listener)

    def request_stop(self, reason: StopReason) -> None:
        self.lifecycle.request_stop(reason)

    def request(self, action: Action) -> object:
        """Carry out ``action`` on the VMM's main thread (any thread may ask; see actions.py):
        its result, or its error (StateError when the VM's state does not allow it)."""
        return self._actions.submit(functools.partial(controller.handle, self, action))

    # --- lifecycle ---
    def pause(self) -> None:
        """Stop the guest: every vCPU out of KVM_RUN, device work quiescent, the clock held.
        While the state loads (inmigrate), the VM will stay paused once it is in (as QEMU)."""
        life = self.lifecycle
        with life.lock:
            if self.state == RunState.INMIGRATE:
                self._run_once_loaded = False
                return
            life.require(RunState.RUNNING)
            self._stop_guest()
            life.move(RunState.PAUSED)
        life.emit("STOP", {})

    def resume(self) -> None:
        """Run the guest again. While the state loads (inmigrate), it runs once the state is in
        (QEMU's ``cont`` sets autostart then; scripts send it without waiting for the load)."""
        life = self.lifecycle
        with life.lock:
            if self.state == RunState.INMIGRATE:
                self._run_once_loaded = True
                return
            if self.state != RunState.POSTMIGRATE:     # cont after a migration is allowed, as in QEMU
                life.require(RunState.PAUSED)
            if life.migrating == "snapshot":
                raise StateError("a snapshot is being written; cont once it has completed")
            if self.state == RunState.POSTMIGRATE:
                self._take_images()     # unless the destination holds them now
            self._start_guest()
            life.move(RunState.RUNNING)
        life.emit("RESUME", {})

    def _take_images(self) -> None:
        assert self.hotplug is not None
        try:
            self.hotplug.take_images()
        except HotplugError as e:
            raise StateError(str(e)) from e

    def _stop_guest(self) -> None:
        """StateError, the guest running on, if device work does not come to rest."""
        for v in self.vcpus:
            v.pause()
        self.io.pause()
        assert self.devices is not None and self.vm is not None
        try:
            self.devices.quiesce()
        except DeviceBusyError as e:
            self.io.resume()
            for v in self.vcpus:
                v.resume()
            raise StateError(f"cannot stop the guest: {e}") from e
        self._clock = self.vm.get_clock()

    def _start_guest(self) -> None:
        assert self.vm is not None and self._clock is not None
        # The guest's kvmclock continues from where it stopped: no jump over the pause.
        self.vm.set_clock(S.kvm_clock_data(clock=self._clock.clock))
        self.io.resume()
        for v in self.vcpus:
            v.resume()

    # --- snapshots and migration (driven by vmm/migration.py) ---
    def save_state(self) -> tuple[dict[str, Any], list[Section]]:
        """The stopped VM's header and sections (see vmm/snapshot.py). SaveError if a device
        cannot be saved now; StateError unless stopped."""
        from . import snapshot
        with self.lifecycle.lock:
            self.lifecycle.require(RunState.PAUSED, RunState.FINISH_MIGRATE)
            assert self._clock is not None
            return snapshot.save(self, self.snapshot_msrs(), self._clock.clock)

    def snapshot_msrs(self) -> list[int]:
        """The MSRs a snapshot keeps, found once, before the vCPUs first run and the main
        thread is confined (:meth:`run` asks then, for a VM that can migrate):
        KVM_GET_MSR_INDEX_LIST is not in the main thread's allow-list, and no migration's
        downtime pays for it."""
        if self._snapshot_msrs is None:
            assert self.kvm is not None
            self._snapshot_msrs = arch.snapshot_registers(self.kvm, self.vcpus[0].vcpu)
        return self._snapshot_msrs

    def stop_for_migration(self) -> RunState:
        """Stop the guest for the last copy of a live migration (finish-migrate) and let the
        destination lock the disk images; returns the state to go back to if it fails."""
        life = self.lifecycle
        with life.lock:
            life.require(RunState.RUNNING, RunState.PAUSED)
            was = self.state
            if was == RunState.RUNNING:
                self._stop_guest()
            life.move(RunState.FINISH_MIGRATE)
            if self.hotplug is not None:
                self.hotplug.release_images()
        if was == RunState.RUNNING:
            life.emit("STOP", {})
        return was

    def end_migration(self, completed: bool, was: RunState) -> None:
        """After the last copy: postmigrate if the destination took the VM, else back to ``was``."""
        life = self.lifecycle
        with life.lock:
            if self.state != RunState.FINISH_MIGRATE:
                return                  # stopped meanwhile
            if completed:
                life.move(RunState.POSTMIGRATE)
                return
            try:
                self._take_images()
            except StateError as e:
                log.error("after a failed migration: %s", e)
            if was == RunState.RUNNING:
                self._start_guest()
            life.move(was)
        if was == RunState.RUNNING:
            life.emit("RESUME", {})

    def expect_incoming(self) -> None:
        """Before :meth:`run`: the VM waits in inmigrate, vCPUs and devices still, for
        :meth:`load_state`."""
        with self.lifecycle.lock:
            self.lifecycle.move(RunState.INMIGRATE)
        for v in self.vcpus:
            v.pause()                   # not started yet: they park as they start
        self.io.pause()

    def load_state(self, header: dict[str, Any], sections: dict[str, Section], *, resume: bool,
                   new_generation: bool) -> None:
        """Take a snapshot's state; paused after, or running if ``resume``.
        ``new_generation``: a VM started again from a snapshot (perhaps one of several clones)
        gets a new VM generation ID; a migrated one keeps its own. SnapshotError naming the
        section and the reason if it does not fit this VM."""
        from ..snapshot.format import SnapshotError
        from . import snapshot
        with self.lifecycle.lock:
            self.lifecycle.require(RunState.INMIGRATE)
            self._clock = S.kvm_clock_data(clock=snapshot.restore(self, header, sections))
            try:
                self._take_images()
            except StateError as e:
                raise SnapshotError(str(e)) from e
            if self.vmgenid is not None and new_generation:
                self.vmgenid.change()
            elif self.vmgenid is not None:
                self.vmgenid.taken_from_ram()
            self.lifecycle.move(RunState.PAUSED)
            if self.lost_ticks is not None:
                self.lost_ticks.discard()
        if resume or self._run_once_loaded:
            self.resume()

    def reset(self) -> None:
        """Reset the machine as its reset line would (QMP system_reset): every virtio
        device reset, RAM cleared and the kernel loaded again, vCPUs and interrupt
        controllers back at power-on. A paused VM stays paused; RESET is announced."""
        life = self.lifecycle
        with life.lock:
            life.require(RunState.RUNNING, RunState.PAUSED)
            if life.migrating:
                raise StateError("a migration is in progress; migrate_cancel it first")
            assert self.vm is not None and self.mem is not None and self.devices is not None
            assert self.read_boot_inputs is not None and self.power_on is not None
            if self.boot_inputs is None:    # loaded from a snapshot: the kernel is read now
                try:
                    self.boot_inputs = self.read_boot_inputs()
                except VmmError as e:
                    raise StateError(f"cannot boot again: {e}") from e
            from .builder import prepare_boot
            with self._held(vcpus=True, devices=True):
                self.devices.reset()        # before RAM goes: no device writes into it afterwards
                self.mem.discard()
                plan = prepare_boot(self)
                if self.vmgenid is not None:
                    self.vmgenid.write()    # the same VM: the same generation
                vcpus = [v.vcpu for v in self.vcpus]
                arch.restore_state(self.vm, vcpus, self.power_on, reset=True)
                arch.setup_boot_regs(vcpus[0], plan)
        log.info("system reset")
        life.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def powerdown(self) -> None:
        """Ask the guest to shut down: the ACPI power button, or without ACPI
        Ctrl-Alt-Del on the keyboard (as Firecracker does)."""
        with self.lifecycle.lock:
            self.lifecycle.require(RunState.RUNNING, RunState.PAUSED)
            assert self.devices is not None
            if self.devices.acpi is not None:
                self.devices.acpi.press_power_button()
            else:
                assert self.devices.i8042 is not None
                self.devices.i8042.ctrl_alt_del()
        self.lifecycle.emit("POWERDOWN", {})

    def ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the i8042 keyboard (Firecracker's SendCtrlAltDel)."""
        with self.lifecycle.lock:
            self.lifecycle.require(RunState.RUNNING)
            assert self.devices is not None and self.devices.i8042 is not None
            self.devices.i8042.ctrl_alt_del()

    @contextlib.contextmanager
    def _held(self, *, vcpus: bool, devices: bool) -> Iterator[None]:
        """Keep the vCPUs and/or device work still for the block, if the VM is running
        (otherwise they are still already). The caller holds the lifecycle lock."""
        running = self.state == RunState.RUNNING
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
    def devices_still(self) -> Iterator[None]:
        """Hold device work still (a slot is changing), whether the guest runs or not."""
        with self.lifecycle.lock:
            if self.state == RunState.SHUTDOWN:
                raise StateError("the VM is shutting down")
            if self.state == RunState.INMIGRATE:
                raise StateError("the VM waits for its state (inmigrate), which brings its devices")
            if self.lifecycle.migrating:
                raise StateError("a migration is in progress")
            with self._held(vcpus=False, devices=True):
                yield

    def change_image(self, drive_id: str, path: str) -> None:
        """Back disk ``drive_id`` by the image at ``path`` from now on (see Hotplug.change_image);
        the configuration a snapshot keeps names it too. HotplugError if it cannot."""
        assert self.hotplug is not None
        self.hotplug.change_image(drive_id, path)
        for drive in self.cfg.drives:
            if drive.id == drive_id:
                drive.path = path

    def device_deleted(self, name: str) -> None:
        self.lifecycle.emit("DEVICE_DELETED", {"device": name, "path": name})

    def vcpu_info(self) -> list[VcpuInfo]:
        """Per vCPU: index, native thread id and whether it is halted (read outside KVM_RUN)."""
        with self.lifecycle.lock, self._held(vcpus=True, devices=False):
            return [VcpuInfo(v.index, v.thread_id, v.vcpu.get_mp_state() != K.KVM_MP_STATE_RUNNABLE)
                    for v in self.vcpus]

    # --- running ---
    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_stop(StopReason("host-signal", False, 128 + signum))

    def run(self, on_running: Callable[[], None] | None = None) -> StopReason:
        """Run until stopped; returns why. Must be called on the main thread."""
        install_kick_handler()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        loop = self._loop
        loop.add(self.lifecycle.stop_fd, loop.stop_soon)    # request_stop() sets the reason first
        console = self.devices.console if self.devices else None
        if self.migration is not None:
            self.snapshot_msrs()        # while the vCPUs are still and this thread is free
        try:
            if console:
                console.start(loop)
            self.io.start()
            if self.hotplug is not None and self.hotplug.disks:
                self.block_pool.start()         # only a VM with disk slots needs it
            for v in self.vcpus:
                v.start()
            with self.lifecycle.lock:
                if self.state == RunState.PRELAUNCH:
                    self.lifecycle.move(RunState.RUNNING)
                    if self.lost_ticks is not None:
                        self.lost_ticks.discard()
            if on_running:
                on_running()
            loop.run()
        finally:
            self._actions.close()
            for v in self.vcpus:
                v.resume()
                v.exit()
            self.io.resume()
            self.io.stop()
            if console:
                console.stop()
            for s, h in old.items():
                signal.signal(s, h)
        assert self.stop_reason is not None
        return self.stop_reason

    def close(self) -> None:
        """Release every fd and mapping; safe after a partial build."""
        for v in self.vcpus:
            v.vcpu.close()
        self.vcpus.clear()
        if self.devices is not None:
            self.devices.close()
        self.block_pool.stop()
        self.io.stop()
        self._actions.close()
        self._loop.stop()
        self.lifecycle.close()
        if self.lost_ticks is not None:
            self.lost_ticks.close()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
