"""What every virtio device implements, and the interrupt line it raises.

A device describes itself (ID, features, config space, queue sizes) and is
activated by its transport once the driver has set DRIVER_OK. Queue work
runs on the I/O thread; a device that finds a queue malformed calls
``interrupt.needs_reset(reason)`` and stops using its queues.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ...errors import AltoVirtError
from ...eventloop import EventLoop
from ...memory import GuestMemory
from .queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, DescriptorChain, Queue, QueueError

log = logging.getLogger(__name__)

# Device IDs (5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19
# Transport-independent feature bits (6)
VIRTIO_F_VERSION_1 = 32
COMMON_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
# InterruptStatus bits (4.2.2)
VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2


class DeviceBusyError(AltoVirtError):
    """Device work that did not finish in time (the VM cannot be paused with it in flight)."""


class Interrupt:
    """The device's interrupt: InterruptStatus bits plus an edge on its irqfd."""

    def __init__(self, irqfd: int, on_needs_reset: Callable[[str], None]) -> None:
        self.fd = irqfd
        self._lock = threading.Lock()
        self.status = 0
        self._sticky = 0
        self._on_needs_reset = on_needs_reset

    def read(self) -> int:
        """InterruptStatus, as the driver reads it. Reading acknowledges: the VMM has KVM
        absorb InterruptACK writes (an ioeventfd), so that an interrupt costs one exit to us,
        not two. Bits raised after the read stay set, as with read-then-ACK-what-you-read."""
        with self._lock:
            status, self.status = self.status, self.status & self._sticky
        return status

    def trigger(self, bits: int = VIRTIO_MMIO_INT_VRING) -> None:
        with self._lock:
            self.status |= bits
        os.eventfd_write(self.fd, 1)

    def ack(self, bits: int) -> None:
        with self._lock:
            self.status &= ~bits | self._sticky

    def stick(self, bits: int) -> None:
        """Keep ``bits`` set (0: none) for a device whose queues the host kernel serves: it
        raises the interrupt through the irqfd without telling us, and Linux looks at its
        queues only when InterruptStatus says so (an extra look finds nothing and costs little)."""
        with self._lock:
            self._sticky = bits
            self.status = self.status & ~VIRTIO_MMIO_INT_VRING | bits

    def restore(self, status: int) -> None:
        """InterruptStatus as saved. The interrupt it still owes is raised by
        :meth:`raise_pending` once the interrupt controllers are restored too: an edge
        sent before would be lost when their saved state is put back."""
        with self._lock:
            self.status = status

    def raise_pending(self) -> None:
        """Raise the interrupt again if InterruptStatus has bits set (after a restore)."""
        if self.status:
            os.eventfd_write(self.fd, 1)

    def signal_used(self, queue: Queue) -> None:
        """Interrupt for newly used buffers, unless the driver suppressed it."""
        if queue.needs_interrupt():
            self.trigger(VIRTIO_MMIO_INT_VRING)

    def needs_reset(self, reason: str) -> None:
        self._on_needs_reset(reason)

    def queue_fd(self, index: int) -> int:
        """The eventfd that raises queue ``index``'s interrupt, for a back end in the host
        kernel or another process to signal itself (vhost's call descriptor)."""
        return self.fd


@dataclass(frozen=True)
class Active:
    """What a device works with between activation (DRIVER_OK) and reset."""

    mem: GuestMemory
    queues: list[Queue]
    interrupt: Interrupt


class Device(Protocol):
    """What a transport asks of the device behind it (:class:`VirtioDevice` is the usual one).

    A device is inactive until ``activate`` hands it the driver's queues (DRIVER_OK) and
    inactive again after ``reset``; while active, ``queue_notify`` brings it work on the
    I/O thread. ``broken`` is set when it gave up on its queues (NEEDS_RESET). A slot
    hot-replaces its device by ``reset`` and ``detach``, leaving the backend open;
    ``close`` releases the backend too. ``quiesce`` waits out requests in flight (the VM is
    pausing); ``prepare_save`` comes before a saved state."""

    features: int               # what the driver accepted
    broken: bool

    @property
    def name(self) -> str: ...
    @property
    def device_id(self) -> int: ...
    @property
    def queue_sizes(self) -> tuple[int, ...]: ...
    @property
    def config(self) -> bytearray: ...

    def device_features(self) -> int: ...
    def adopt_config(self, saved: bytes) -> None: ...
    def read_config(self, offset: int, size: int) -> int: ...
    def write_config(self, offset: int, size: int, value: int) -> None: ...
    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None: ...
    def queue_notify(self, index: int) -> None: ...
    def reset(self) -> None: ...
    def quiesce(self) -> None: ...
    def prepare_save(self) -> None: ...
    def detach(self) -> None: ...
    def unplugged(self) -> None: ...
    def close(self) -> None: ...


class VirtioDevice:
    """Base class: override the class attributes and the hooks below.

    A device is inactive (``active`` None) until the transport activates it with
    the driver's queues, and again after a reset; a transport hot-replaces it by
    resetting and detaching it (see MmioTransport.replace)."""

    device_id = 0
    queue_sizes: tuple[int, ...] = ()

    def __init__(self, name: str) -> None:
        self.name = name
        # Firecracker's metrics counters for this device, by name; whoever reports them swaps
        # in a new Counter (see vmm/metrics.py), so a count is in one report.
        self.counters: collections.Counter[str] = collections.Counter()
        self.config = bytearray()
        self.features = 0               # what the driver accepted
        self.active: Active | None = None
        self.broken = False

    def device_features(self) -> int:
        return COMMON_FEATURES

    def adopt_config(self, saved: bytes) -> None:
        """Take from a saved configuration space what the device made up itself (a NIC's
        generated MAC), so that the same device in a new process takes the saved state;
        nothing by default."""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little") if offset < len(self.config) else 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Most config spaces are read-only; writes are ignored unless overridden."""

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        self.active = Active(mem, queues, interrupt)
        self.broken = False

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (I/O thread)."""

    def reset(self) -> None:
        self.active = None

    def quiesce(self) -> None:
        """Return when no request is in flight (the VM is being paused); DeviceBusyError if
        some are still after a while."""

    def prepare_save(self) -> None:
        """Line the device's own state up with its rings, which are about to be saved
        (device work is held still): buffers it took and still holds go back to the
        driver, and what cannot move to another process ends as the guest expects."""

    def detach(self) -> None:
        """Stop using the backend but leave it open: it outlives the device (hot-unplug)."""

    def unplugged(self) -> None:
        """Out of its slot for good (hot-unplug, after :meth:`detach`): release what is the
        device's own; the backend it was put on stays open."""

    def close(self) -> None:
        """Release the device and its backend (files, sockets) when the VM goes away."""
        self.detach()

    def chains(self, queue: Queue) -> Iterator[DescriptorChain]:
        """The chains the driver made available on ``queue``. A malformed one puts
        the device in NEEDS_RESET and ends the iteration."""
        while not self.broken:
            try:
                chain = queue.pop()
            except QueueError as e:
                self.fail(str(e))
                return
            if chain is None:
                return
            yield chain

    def fail(self, reason: str) -> None:
        """Stop using the queues: the driver broke the rules (or the backend died)."""
        if not self.broken:
            self.broken = True
            log.error("%s: %s; the device needs a reset", self.name, reason)
            active = self.active        # a vCPU thread may reset the device meanwhile
            if active is not None:
                active.interrupt.needs_reset(reason)
