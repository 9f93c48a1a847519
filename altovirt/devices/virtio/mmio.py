"""The virtio-mmio transport, version 2 (VIRTIO 1.2, section 4.2).

One 4 KiB slot per device in the 32-bit MMIO gap, announced to Linux as
``virtio_mmio.device=4K@<base>:<irq>``. Register accesses arrive on vCPU
threads as MMIO exits; queue notifications do not: each queue has an
eventfd that KVM signals itself (KVM_IOEVENTFD on QueueNotify with the
queue index as datamatch) and that the I/O thread waits on.
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

# Registers (4.2.2)
MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976              # "virt"
MMIO_VERSION = 2
VENDOR = 0x554D4551             # "QEMU", what Linux and QEMU expect from a generic vendor

# Device status bits (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128


class MmioTransport:
    """A BusDevice for one virtio device's slot."""

    def __init__(self, device: Device, mem: GuestMemory, irqfd: int, io: EventLoop) -> None:
        self.device = device
        self.mem = mem
        self.io = io
        self.lock = threading.RLock()
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in device.queue_sizes]
        self.queues = [Queue(n, mem, fd) for n, fd in zip(device.queue_sizes, self.notify_fds, strict=True)]
        self.interrupt = Interrupt(irqfd, self._needs_reset)
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
        for fd in self.notify_fds:
            self.io.remove(fd)
            os.close(fd)

    def replace(self, device: Device) -> Device:
        """Hot-replace: put ``device`` (same ID and queues) behind this slot and return the
        old one, reset and detached from its backend but not closed.

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
    def save(self) -> TransportState:
        """The slot's state, once the device has lined its own up with its rings
        (``Device.prepare_save``). SaveError if the device cannot be saved now."""
        from .persist import TransportState  # only when saving: see persist's docstring
        with self.lock:
            self.device.prepare_save()
            return TransportState(self.device.device_id, bytes(self.device.config), self.status,
                                  self.features_sel, self.driver_features, self.driver_features_sel,
                                  self.queue_sel, self.config_generation, self.interrupt.status,
                                  self.device.broken, tuple(q.save() for q in self.queues))

    def restore(self, state: TransportState) -> None:
        """Take ``state``: a device the driver had started is started again on its queues,
        where they stood. SavedStateError, with the slot unchanged, if the state does not fit it."""
        from ...persist import check, check_int
        check(state.device_id == self.device.device_id,
              f"a slot of device {state.device_id} cannot restore {self.device.name}'s")
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

    # --- registers (vCPU threads) ---
    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            with self.lock:
                return self.device.read_config(offset - CONFIG, size)
        if size != 4:
            log.debug("%s: %d-byte read of register %#x ignored", self.device.name, size, offset)
            return 0
        if offset == INTERRUPT_STATUS:
            # Every interrupt's first question: answered without the transport lock, which the
            # I/O thread holds while it works the queues (the interrupt has a lock of its own).
            return self.interrupt.read()
        q = self._queue()
        with self.lock:
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION:
                return MMIO_VERSION
            if offset == DEVICE_ID:
                return self.device.device_id
            if offset == VENDOR_ID:
                return VENDOR
            if offset == DEVICE_FEATURES:
                return (self.device.device_features() >> (32 * self.features_sel)) & 0xFFFFFFFF \
                    if self.features_sel < 2 else 0
            if offset == QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == STATUS:
                return self.status
            if offset == CONFIG_GENERATION:
                return self.config_generation
            if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
                return 0xFFFFFFFF       # no shared memory regions
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            with self.lock:
                self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4:
            log.debug("%s: %d-byte write of register %#x ignored", self.device.name, size, offset)
            return
        if offset == INTERRUPT_ACK:
            self.interrupt.ack(value)       # without the transport lock, as InterruptStatus
            return
        with self.lock:
            if offset == QUEUE_NOTIFY:
                # Only reached when the ioeventfd did not take it (e.g. while it is being set up).
                if value < len(self.notify_fds):
                    os.eventfd_write(self.notify_fds[value], 1)
            elif offset == DEVICE_FEATURES_SEL:
                self.features_sel = value
            elif offset == DRIVER_FEATURES:
                if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == QUEUE_SEL:
                self.queue_sel = value
            elif offset == STATUS:
                self._set_status(value)
            else:
                self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None or (q.ready and offset != QUEUE_READY):
            return      # 4.2.2.2: the driver must not change a ready queue
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_READY:
            q.ready = bool(value & 1)
        elif offset == QUEUE_RESET and value == 1:
            q.reset()
        else:
            field, high = {
                QUEUE_DESC_LOW: ("desc_addr", False), QUEUE_DESC_HIGH: ("desc_addr", True),
                QUEUE_DRIVER_LOW: ("avail_addr", False), QUEUE_DRIVER_HIGH: ("avail_addr", True),
                QUEUE_DEVICE_LOW: ("used_addr", False), QUEUE_DEVICE_HIGH: ("used_addr", True),
            }.get(offset, (None, False))
            if field is not None:
                old = getattr(q, field)
                new = (old & 0xFFFFFFFF) | (value << 32) if high else (old & ~0xFFFFFFFF) | value
                setattr(q, field, new)

    def _set_status(self, value: int) -> None:
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
