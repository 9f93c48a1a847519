"""Devices whose queues are served outside the VMM: by the host kernel (vhost) or by another
process (vhost-user). The front end's half of vhost, written once for vhost-net, vhost-vsock and
virtio-fs.

The split follows rust-vmm's vhost crate and Cloud Hypervisor: one interface for every back end
(:class:`Backend`, the part of rust-vmm's ``VhostBackend`` these devices use, which
:class:`~...backends.vhost.Vhost` and :class:`~...backends.vhost_user.VhostUser` both meet), and
one base for the devices (:class:`OffloadedDevice`, as Cloud Hypervisor's ``VhostUserCommon``),
which does what they share; each device keeps what is its own (vhost-net its tap and offloads,
vhost-vsock its guest CID, virtio-fs its tag and configuration space).

At DRIVER_OK the back end is told the features, the memory table and each ring (with its kick,
the ioeventfd KVM signals, and its call, the irqfd), and then the device switches it on. While a
back end serves a queue, it reads the queue's notifier itself, so the I/O thread stops watching
it; and it raises the interrupt through the irqfd without telling us, so InterruptStatus always
says "used buffers" (see :meth:`~.device.Interrupt.stick`), as QEMU and Firecracker do for
virtio-mmio devices served outside the VMM. At reset the queues are taken back, each from where
the back end left it. A back end that refuses the queues, or goes away, puts this device alone
in DEVICE_NEEDS_RESET; the VM runs on.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import COMMON_FEATURES, VIRTIO_MMIO_INT_VRING, Active, Interrupt, VirtioDevice
from .queue import Queue

log = logging.getLogger(__name__)

MemoryTable = list[tuple[int, int, int, int]]   # (guest address, size, userspace address, offset in RAM)


class Backend(Protocol):
    """What serves a device's queues, and what the front end asks of it.

    ``features`` is what the back end offers; the calls raise OSError when it refuses (a
    vhost-user back end's :class:`~...backends.vhost_user.VhostUserError` among them)."""

    features: int

    @property
    def fd(self) -> int:
        """The vhost device, or the connection to the back end (watched for its end)."""
        ...

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: MemoryTable, fd: int | None) -> None:
        """Guest RAM: ``regions`` of the memfd ``fd`` (None: RAM is private to this process)."""
        ...

    def start_vring(self, index: int, size: int, next_avail: int, rings: tuple[int, int, int],
                    kick: int, call: int) -> None: ...

    def stop_vring(self, index: int) -> int: ...

    def close(self) -> None: ...


@dataclass
class Offload:
    """A device's back end, and what it was handed (:class:`OffloadedDevice`'s state)."""

    backend: Backend
    # Start and stop are serialized, whichever thread asks (reset and hot-replace come with the
    # transport's lock, close without it); never held while the device fails, which takes the
    # transport's lock.
    lock: threading.Lock = field(default_factory=threading.Lock)
    handed: tuple[Active, EventLoop] | None = None      # what the back end serves now
    watched_by: EventLoop | None = None                 # the loop watching the connection's end


class OffloadedDevice(VirtioDevice):
    """Base for a device whose queues a back end serves from DRIVER_OK to reset.

    A subclass sets ``self.offload`` in its ``__init__`` and the class attributes below, and may
    override the hooks ``_enable_backend`` and ``_disable_backend`` (its own switch, after the
    rings are handed over and before they are taken back) and ``_served_by`` (the log line).
    It comes before another device class in the bases (vhost-net is a virtio-net device with
    these methods), so that the lifecycle here wraps that class's own.

    Contract: ``activate`` starts the back end; if the back end refuses, the queues are taken back
    and the device fails (NEEDS_RESET) with ``refused`` and the back end's reason. ``reset`` and
    ``detach`` stop it and take the queues back (twice is harmless). ``prepare_save`` raises
    SaveError: the queues' state is the back end's. ``close`` stops and closes the back end and
    leaves the queues (the VM is going away).
    """

    offload: Offload
    offloaded_queues: ClassVar[tuple[int, ...]]         # the queues the back end serves
    # The ring features (6) the device offers only where the back end supports them.
    ring_features: ClassVar[int] = COMMON_FEATURES
    refused: ClassVar[str] = ""                         # what precedes a refusal's reason
    cannot_save: ClassVar[str]                          # why a save is refused

    def device_features(self) -> int:
        return super().device_features() & ~(self.ring_features & ~self.offload.backend.features)

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        with self.offload.lock:
            refusal = self._start(io)
        if refusal is not None:
            self.fail(refusal)              # without the offload's lock: failing takes the transport's

    def queue_notify(self, index: int) -> None:
        """Nothing to do: the back end takes the notifications of the queues it serves (the
        transport notifies once more after activation, for buffers made available before);
        buffers on another queue (vhost-vsock's event queue) wait."""

    def reset(self) -> None:
        with self.offload.lock:
            self._stop()
        super().reset()

    def prepare_save(self) -> None:
        from ...persist import SaveError  # only when saving: see persist's docstring
        raise SaveError(f"{self.name}: {self.cannot_save}")

    def detach(self) -> None:
        with self.offload.lock:
            self._stop()
        super().detach()

    def close(self) -> None:
        # The VM goes away: its loop has stopped and the transport closes the queues' notifiers,
        # so the queues are not taken back; the back end stops with its descriptor's close.
        with self.offload.lock:
            if self.offload.handed is not None:
                self.offload.handed = None
                self._disable_backend()
        super().close()
        self._unwatch_backend()
        self.offload.backend.close()

    # --- hooks ---
    def _enable_backend(self) -> None:
        """The last step of a start, once the rings are handed over (OSError if refused)."""

    def _disable_backend(self) -> None:
        """The first step of a stop; logs its own errors (the queues are taken back anyway)."""

    def _served_by(self) -> str:
        """What the log says once the back end serves the queues."""
        return "the back end serves the queues"

    # --- the back end's connection ---
    def _watch_backend(self, io: EventLoop, gone: str) -> None:
        """Watch the connection for its end: the device then fails with ``gone``. What the back
        end says comes only as replies, read by whoever asked; anything else fails the next
        request."""
        self.offload.watched_by = io
        io.add(self.offload.backend.fd, lambda: self._backend_gone(gone), select.EPOLLRDHUP)

    def _backend_gone(self, gone: str) -> None:
        """I/O thread: the back end closed the connection."""
        self._unwatch_backend()
        self.fail(gone)

    def _unwatch_backend(self) -> None:
        """Stop watching the connection (once, from either thread: before it is closed, so that
        its descriptor's number, free again, is never taken off the loop)."""
        with self.offload.lock:
            io, self.offload.watched_by = self.offload.watched_by, None
            if io is not None:
                io.remove(self.offload.backend.fd)

    # --- start and stop (with the offload's lock) ---
    def _start(self, io: EventLoop) -> str | None:
        """Have the back end serve the queues; if it refuses, take them back and return why."""
        assert self.active is not None
        active = self.active
        self.offload.handed = active, io
        backend, mem = self.offload.backend, active.mem
        try:
            backend.set_features(self.features & backend.features)
            backend.set_mem_table(_memory_table(mem), mem.fd)
            _hand_over(backend, active, io, self.offloaded_queues)
            self._enable_backend()
        except OSError as e:
            self._stop()
            return self.refused + (e.strerror or str(e))
        # Under the device's module, as it always was: readers of the log match the line.
        logging.getLogger(type(self).__module__).info("%s: %s", self.name, self._served_by())
        return None

    def _stop(self) -> None:
        handed, self.offload.handed = self.offload.handed, None
        if handed is None:
            return
        self._disable_backend()
        # A broken device is reset before it serves again, which starts its queues afresh: its
        # back end (gone, perhaps) is not asked where they stood.
        _take_back(None if self.broken else self.offload.backend, *handed, self.offloaded_queues,
                   self.name)


def _memory_table(mem: GuestMemory) -> MemoryTable:
    return [(r.gpa, r.size, mem.host_address(r), r.offset) for r in mem.regions]


def _hand_over(backend: Backend, active: Active, io: EventLoop, indices: Iterable[int]) -> None:
    """Have ``backend`` serve queues ``indices`` from where they stand."""
    mem = active.mem
    active.interrupt.stick(VIRTIO_MMIO_INT_VRING)
    for i in indices:
        q = active.queues[i]
        io.modify(q.notifier, 0)            # the back end's from now on
        desc, avail, used = (mem.host_address_of(addr, n) for addr, n in q.ring_ranges())
        backend.start_vring(i, q.size, q.next_avail, (desc, avail, used), q.notifier,
                            active.interrupt.queue_fd(i))


def _take_back(backend: Backend | None, active: Active, io: EventLoop, indices: Iterable[int],
               name: str) -> None:
    """Stop ``backend`` on queues ``indices`` (None: do not ask it) and watch them here again,
    each from where the back end left it."""
    for i in indices:
        q = active.queues[i]
        if backend is not None:
            try:
                q.next_avail = backend.stop_vring(i)
            except OSError as e:
                log.warning("%s: stopping queue %d: %s", name, i, e.strerror)
        io.modify(q.notifier, select.EPOLLIN)
    active.interrupt.stick(0)
