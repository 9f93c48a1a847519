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
from typing import TYPE_CHECKING

from .. import arch
from ..config import VmConfig
from ..devices.legacy.vmgenid import VmGenId
from ..devices.virtio.block import WorkerPool
from ..devices.virtio.device import VIRTIO_ID_BLOCK, DeviceBusyError
from ..errors import VmmError
from ..eventloop import EventLoop
from ..kvm import Kvm
from ..kvm import Vm as KvmVm
from ..kvm import ioctls as K
from ..memory import GuestMemory
from ..sandbox import seccomp
from .action_queue import ActionQueue
from .boot import Boot
from .device_manager import DeviceManager
from .hotplug import Hotplug, HotplugError
from .lifecycle import Lifecycle, Listener, RunState, StateError
from .pit import LostTicks
from .vcpu import StopReason, VcpuThread, install_kick_handler

if TYPE_CHECKING:
    from ..devices.virtio.vsock import Vsock
    from ..xenstore.store import Store
    from .actions import Action, Migrations
    from .fork import Forker

__all__ = ["Machine", "VcpuInfo", "VmmError"]

log = logging.getLogger(__name__)
# What carries out an action on the main thread (vmm/controller.py's handle, which the
# builder hands in: the requests know the machine, not the other way round).
Handler = Callable[["Machine", "Action"], object]


@dataclass(frozen=True)
class VcpuInfo:
    index: int
    thread_id: int
    halted: bool


class Machine:
    """A built VM: every part the builder made (vmm/builder.py), complete from the start.
    Any thread may ask for an action (:meth:`request`) or a stop (:meth:`request_stop`)."""

    def __init__(self, cfg: VmConfig, *, kvm: Kvm, vm: KvmVm, mem: GuestMemory, lifecycle: Lifecycle,
                 io: EventLoop, block_pool: WorkerPool, devices: DeviceManager, vcpus: list[VcpuThread],
                 boot: Boot, power_on: arch.PowerOnState, lost_ticks: LostTicks, xenstore: Store | None,
                 handle: Handler, migrations: Callable[[Machine], Migrations] | None = None) -> None:
        """``handle`` carries out actions (see :meth:`request`); ``migrations`` makes the
        migration service of a VM that can be snapshotted and migrated."""
        self.cfg = cfg
        self.kvm, self.vm, self.mem = kvm, vm, mem
        self.lifecycle, self.io, self.block_pool = lifecycle, io, block_pool
        self.devices, self.vcpus = devices, vcpus
        self.boot = boot
        self.power_on = power_on        # what system_reset puts back
        self.lost_ticks = lost_ticks
        self.xenstore = xenstore        # the guest is domain cfg.xen_domid, its home made at start
        self._handle = handle
        self._loop = EventLoop("main", functools.partial(seccomp.confine, "main"))
        self._actions = ActionQueue(self._loop)
        self.clock: int | None = None       # the guest's clock while it is stopped (arch.read_clock)
        self._snapshot_msrs: list[int] | None = None
        # Seconds the VM's whole state last took to save or load here (snapshot.py): what a live
        # migration expects its stop to cost (convergence.py). None until it has been.
        self.state_seconds: float | None = None
        # QEMU's autostart: 'cont' while the state loads (inmigrate) runs the VM once it is in.
        self.run_once_loaded = False
        self.migration = migrations(self) if migrations is not None else None
        self.forker: Forker | None = None       # vm-fork's thread, once the VM runs with an API
        self._closed = False
        lifecycle.add_listener(self._end_vcpus_on_shutdown)

    # --- what the API and the CLI see ---
    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def stop_reason(self) -> StopReason | None:
        return self.lifecycle.stop_reason

    @property
    def hotplug(self) -> Hotplug | None:
        return self.devices.hotplug

    @property
    def vsock(self) -> Vsock | None:
        return self.devices.vsock

    @property
    def vmgenid(self) -> VmGenId | None:      # the VM generation ID device (with ACPI)
        return self.devices.vmgenid

    def add_event_listener(self, listener: Listener) -> None:
        self.lifecycle.add_listener(listener)

    def request_stop(self, reason: StopReason) -> None:
        self.lifecycle.request_stop(reason)

    def request(self, action: Action) -> object:
        """Carry out ``action`` on the VMM's main thread (any thread may ask; see actions.py):
        its result, or its error (StateError when the VM's state does not allow it)."""
        return self._actions.submit(functools.partial(self._handle, self, action))

    # --- lifecycle ---
    def pause(self) -> None:
        """Stop the guest: every vCPU out of KVM_RUN, device work quiescent, the clock held.
        While the state loads (inmigrate), the VM will stay paused once it is in (as QEMU)."""
        life = self.lifecycle
        with life.lock:
            if self.state == RunState.INMIGRATE:
                self.run_once_loaded = False
                return
            life.require(RunState.RUNNING)
            self.stop_guest()
            life.move(RunState.PAUSED)
        life.emit("STOP", {})

    def resume(self) -> None:
        """Run the guest again. While the state loads (inmigrate), it runs once the state is in
        (QEMU's ``cont`` sets autostart then; scripts send it without waiting for the load)."""
        life = self.lifecycle
        with life.lock:
            if self.state == RunState.INMIGRATE:
                self.run_once_loaded = True
                return
            if self.state != RunState.POSTMIGRATE:     # cont after a migration is allowed, as in QEMU
                life.require(RunState.PAUSED)
            if life.migrating == "snapshot":
                raise StateError("a snapshot is being written; cont once it has completed")
            if self.state == RunState.POSTMIGRATE:
                self.take_images()      # unless the destination holds them now
            self.start_guest()
            life.move(RunState.RUNNING)
        life.emit("RESUME", {})

    def take_images(self) -> None:
        """Lock the disk images (the source of a migration has let them go); StateError if
        another process still holds one."""
        if self.hotplug is None:
            return
        try:
            self.hotplug.take_images()
        except HotplugError as e:
            raise StateError(str(e)) from e

    def stop_guest(self) -> None:
        """Every vCPU out of KVM_RUN, device work at rest, the guest's clock kept; StateError, the
        guest running on, if device work does not come to rest. The caller holds the
        lifecycle lock and moves the state."""
        for v in self.vcpus:
            v.pause()
        self.io.pause()
        try:
            self.devices.quiesce()
        except DeviceBusyError as e:
            self.io.resume()
            for v in self.vcpus:
                v.resume()
            raise StateError(f"cannot stop the guest: {e}") from e
        self.clock = arch.read_clock(self.vm, [v.vcpu for v in self.vcpus])

    def start_guest(self) -> None:
        """The guest runs on from where :meth:`stop_guest` held it."""
        assert self.clock is not None
        # The guest's clock continues from where it stopped: no jump over the pause.
        arch.write_clock(self.vm, [v.vcpu for v in self.vcpus], self.clock)
        self.io.resume()
        for v in self.vcpus:
            v.resume()

    # --- snapshots and migration (driven by vmm/migration.py) ---
    def snapshot_msrs(self) -> list[int]:
        """The MSRs a snapshot keeps, found once, before the vCPUs first run and the main
        thread is confined (:meth:`run` asks then, for a VM that can migrate):
        KVM_GET_MSR_INDEX_LIST is not in the main thread's allow-list, and no migration's
        downtime pays for it."""
        if self._snapshot_msrs is None:
            self._snapshot_msrs = arch.snapshot_registers(self.kvm, self.vcpus[0].vcpu)
        return self._snapshot_msrs

    def expect_incoming(self) -> None:
        """Before :meth:`run`: the VM waits in inmigrate, vCPUs and devices still, for its
        state (snapshot.load_state)."""
        with self.lifecycle.lock:
            self.lifecycle.move(RunState.INMIGRATE)
        for v in self.vcpus:
            v.pause()                   # not started yet: they park as they start
        self.io.pause()

    @contextlib.contextmanager
    def held(self, *, vcpus: bool, devices: bool) -> Iterator[None]:
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

    def vcpu_info(self) -> list[VcpuInfo]:
        """Per vCPU: index, native thread id and whether it is halted (read outside KVM_RUN)."""
        with self.lifecycle.lock, self.held(vcpus=True, devices=False):
            return [VcpuInfo(v.index, v.thread_id, v.vcpu.get_mp_state() != K.KVM_MP_STATE_RUNNABLE)
                    for v in self.vcpus]

    # --- running ---
    def _end_vcpus_on_shutdown(self, event: str, data: dict[str, object]) -> None:
        """A guest that stops (ACPI S5, a reset) runs no instruction after the one that asked,
        as on hardware: its vCPUs leave KVM_RUN now, not once the main loop gets to them.
        Such a request comes on a vCPU thread, whose filter allows the kick (tgkill); the
        API's threads, which a host's stop comes from, may not send it."""
        if event == "SHUTDOWN" and data["guest"]:
            for v in self.vcpus:
                v.end_soon()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_stop(StopReason("host-signal", False, 128 + signum))

    def run(self, on_running: Callable[[], None] | None = None) -> StopReason:
        """Run until stopped; returns why. Must be called on the main thread."""
        install_kick_handler()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        loop = self._loop
        loop.add(self.lifecycle.stop_fd, loop.stop_soon)    # request_stop() sets the reason first
        console = self.devices.console
        if self.migration is not None:
            self.snapshot_msrs()        # while the vCPUs are still and this thread is free
        try:
            if console:
                console.start(loop)
            self.io.start()
            if any(t.device.device_id == VIRTIO_ID_BLOCK for t in self.devices.transports):
                self.block_pool.start()         # only a VM with disks (or empty disk slots) needs it
            for v in self.vcpus:
                v.start()
            with self.lifecycle.lock:
                if self.state == RunState.PRELAUNCH:
                    self.lifecycle.move(RunState.RUNNING)
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
        """Release every fd and mapping (once)."""
        if self._closed:
            return
        self._closed = True
        for v in self.vcpus:
            v.vcpu.close()
        self.devices.close()
        self.block_pool.stop()
        self.io.stop()
        self._actions.close()
        self._loop.stop()
        self.lifecycle.close()
        self.lost_ticks.close()
        self.vm.close()
        self.mem.close()
        self.kvm.close()
