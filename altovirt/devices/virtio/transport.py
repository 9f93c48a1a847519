"""What every virtio transport does, whatever its registers look like (VIRTIO 1.2, 2 and 3):
device status and feature negotiation, the driver's queues, activation at DRIVER_OK, reset,
hot-replacement and the saved state.

A transport's registers arrive on vCPU threads; queue notifications arrive on the I/O thread
through one eventfd a queue, which KVM signals itself (an ioeventfd on the notification
register), so a notification costs the vCPU no exit to us. The virtio-mmio slot
(:mod:`.mmio`) and the virtio-pci function (:mod:`.pci`) decode their registers into the
calls below.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING

from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, Device, Interrupt
from .queue import Queue, QueueError

if TYPE_CHECKING:
    from .persist import TransportState

log = logging.getLogger(__name__)

# Device status bits (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128
# A queue's ring addresses, by the name Queue gives each.
QUEUE_ADDRESSES = ("desc_addr", "avail_addr", "used_addr")


class VirtioTransport:
    """A virtio device behind some registers. Subclasses build ``interrupt`` and decode their
    registers into the methods below, under ``lock``."""

    interrupt: Interrupt

    def __init__(self, device: Device, mem: GuestMemory, io: EventLoop) -> None:
        self.device = device
        self.mem = mem
        self.io = io
        self.lock = threading.RLock()
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in device.queue_sizes]
        self.queues = [Queue(n, mem, fd) for n, fd in zip(device.queue_sizes, self.notify_fds, strict=True)]
        self.status = 0
        self.features_sel = 0
        self.driver_features = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.config_generation = 0
        for i, fd in enumerate(self.notify_fds):
            io.add(fd, functools.partial(self._notified, i, fd))

    def close(self) -> None:
        self.device.close()             # first: a device may still hand its queues back
        self._close_notify_fds()

    def unplug(self) -> Device:
        """Out of the VM for good (PCI hot-unplug): the device reset, detached from its
        backend (which stays open) and released, and the transport's eventfds closed;
        returns the device."""
        with self.lock:
            self.device.reset()
            self.device.detach()
        self.device.unplugged()
        self._close_notify_fds()
        return self.device

    def _close_notify_fds(self) -> None:
        for fd in self.notify_fds:
            self.io.remove(fd)
            os.close(fd)
        self.notify_fds = []

    def replace(self, device: Device) -> Device:
        """Hot-replace: put ``device`` (same ID and queues) behind this transport and return
        the old one, reset and detached from its backend but not closed.

        A driver already running keeps its queues and negotiated features, and
        learns of the change from the configuration generation and a configuration
        change interrupt (4.2.2), as StratoVirt's replaceable slots do. The caller
        keeps the I/O thread from running device work meanwhile.
        """
        if (device.device_id, device.queue_sizes) != (self.device.device_id, self.device.queue_sizes):
            raise ValueError(f"{device.name} does not fit {self.device.name}'s slot")
        with self.lock:
            old = self.device
            old.reset()             # its in-flight requests complete first
            old.detach()
            self.device = device
            if self.status & DRIVER_OK and not old.broken:
                self._start_device()
            else:
                device.broken = old.broken
            self.config_generation += 1
        self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)
        return old

    def reset(self) -> None:
        """A device reset from outside (the machine is reset), as if the driver wrote 0 to Status."""
        with self.lock:
            self._reset()

    # --- saved state (device work is held still) ---
    def save(self, prepare: bool = True) -> TransportState:
        """The transport's state, once the device has lined its own up with its rings
        (``Device.prepare_save``, unless not ``prepare``). SaveError if the device cannot be
        saved now."""
        from .persist import TransportState  # only when saving: see persist's docstring
        with self.lock:
            if prepare:
                self.device.prepare_save()
            return TransportState(self.device.device_id, bytes(self.device.config), self.status,
                                  self.features_sel, self.driver_features, self.driver_features_sel,
                                  self.queue_sel, self.config_generation, self.interrupt.status,
                                  self.device.broken, tuple(q.save() for q in self.queues))

    def restore(self, state: TransportState) -> None:
        """Take ``state``: a device the driver had started is started again on its queues,
        where they stood. SavedStateError, with the transport unchanged, if the state does not fit it."""
        from ...persist import check, check_int
        check(state.device_id == self.device.device_id,
              f"a slot of device {state.device_id} cannot restore {self.device.name}'s")
        if state.config != self.device.config:
            self.device.adopt_config(state.config)
        check(state.config == self.device.config,
              f"{self.device.name}'s configuration space (MAC, capacity, CID...) is not the saved one")
        check(len(state.queues) == len(self.queues),
              f"{len(state.queues)} queues saved; {self.device.name} has {len(self.queues)}")
        check_int(state.status, 0, 0xFF, "status")
        check_int(state.driver_features, 0, (1 << 64) - 1, "driver features")
        for name in ("features_sel", "driver_features_sel", "queue_sel", "config_generation",
                     "interrupt_status"):
            check_int(getattr(state, name), 0, 0xFFFFFFFF, name)
        if state.status & FEATURES_OK:
            check(not state.driver_features & ~self.device.device_features(),
                  f"driver features {state.driver_features:#x} were never offered by {self.device.name}")
        queues = [Queue(q.max_size, self.mem, q.notifier) for q in self.queues]
        for queue, saved in zip(queues, state.queues, strict=True):
            queue.restore(saved)
        with self.lock:
            self._reset()
            self.queues[:] = queues     # the list the device is handed
            self.status, self.features_sel, self.queue_sel = state.status, state.features_sel, state.queue_sel
            self.driver_features, self.driver_features_sel = state.driver_features, state.driver_features_sel
            self.config_generation = state.config_generation
            self.interrupt.restore(state.interrupt_status)
            if state.status & DRIVER_OK and not state.broken:
                self._start_device()
            self.device.broken = state.broken

    # --- notifications (I/O thread) ---
    def _notified(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        with self.lock:
            if self.status & DRIVER_OK and not self.device.broken and self.queues[index].ready:
                self.device.queue_notify(index)

    def _needs_reset(self, reason: str) -> None:
        with self.lock:
            self.status |= DEVICE_NEEDS_RESET
            self.config_generation += 1
        self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    # --- what the registers do (vCPU threads, under ``lock``) ---
    def selected_queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def device_features_word(self) -> int:
        """The 32 feature bits DeviceFeaturesSel selects."""
        return (self.device.device_features() >> (32 * self.features_sel)) & 0xFFFFFFFF \
            if self.features_sel < 2 else 0

    def write_driver_features(self, value: int) -> None:
        """The 32 feature bits DriverFeaturesSel selects; ignored once FEATURES_OK is set."""
        if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def kick(self, index: int) -> None:
        """A notification that reached the registers, not KVM (while its ioeventfd is moved)."""
        if index < len(self.notify_fds):
            os.eventfd_write(self.notify_fds[index], 1)

    def write_queue(self, field: str, value: int, high: bool = False) -> None:
        """Set the selected queue's ``size``, ``ready``, or one of QUEUE_ADDRESSES (its low or
        ``high`` 32 bits), or reset it (``reset``, value 1). A ready queue keeps its
        settings (4.2.2.2, 4.1.4.3.2)."""
        q = self.selected_queue()
        if q is None or (q.ready and field != "ready"):
            return
        if field == "size":
            q.size = value
        elif field == "ready":
            q.ready = bool(value & 1)
        elif field == "reset":
            if value == 1:
                q.reset()
        elif field in QUEUE_ADDRESSES:
            old = getattr(q, field)
            setattr(q, field, (old & 0xFFFFFFFF) | (value << 32) if high else (old & ~0xFFFFFFFF) | value)

    def set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.device_features()
            if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.info("%s: driver features %#x refused (offered %#x; VERSION_1 required)",
                         self.device.name, self.driver_features, offered)
                value &= ~FEATURES_OK
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            self.status = value
            self._activate()
            return
        self.status = (value & ~DEVICE_NEEDS_RESET) | (self.status & DEVICE_NEEDS_RESET)

    def _activate(self) -> None:
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(self.driver_features)
        except QueueError as e:
            self.device.broken = True
            log.error("%s: %s; the device needs a reset", self.device.name, e)
            self._needs_reset(str(e))
            return
        self._start_device()

    def _start_device(self) -> None:
        """Hand the device its active queues with the negotiated features."""
        self.device.features = self.driver_features
        self.device.activate(self.mem, self.queues, self.interrupt, self.io)
        # Buffers made available before now (before DRIVER_OK, or to a replaced device)
        # get looked at at once.
        for i, q in enumerate(self.queues):
            if q.ready:
                os.eventfd_write(self.notify_fds[i], 1)

    def _reset(self) -> None:
        self.device.reset()
        self.device.broken = False
        for q in self.queues:
            q.reset()
        self.status = 0
        self.driver_features = self.driver_features_sel = self.features_sel = self.queue_sel = 0
        self.interrupt.ack(0xFFFFFFFF)
