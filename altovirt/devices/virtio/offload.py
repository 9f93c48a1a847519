"""Queues served outside Python: handed to the host kernel (vhost) or another process
(vhost-user) at DRIVER_OK, and taken back at reset.

While a back end serves a queue, it reads the queue's notifier (the ioeventfd KVM
signals) itself, so the I/O thread stops watching it; and it raises the interrupt
through the irqfd without telling us, so InterruptStatus always says "used buffers"
(see :meth:`~.device.Interrupt.stick`), as QEMU and Firecracker do for virtio-mmio
devices served outside the VMM.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Iterable
from typing import Protocol

from ...eventloop import EventLoop
from .device import VIRTIO_MMIO_INT_VRING, Active

log = logging.getLogger(__name__)


class RingServer(Protocol):
    """What serves the queues: :class:`~...backends.vhost.Vhost` or
    :class:`~...backends.vhost_user.VhostUser`."""

    def start_vring(self, index: int, size: int, next_avail: int, rings: tuple[int, int, int],
                    kick: int, call: int) -> None: ...
    def stop_vring(self, index: int) -> int: ...


def hand_over(server: RingServer, active: Active, io: EventLoop, indices: Iterable[int]) -> None:
    """Have ``server`` serve queues ``indices`` from where they stand."""
    mem = active.mem
    active.interrupt.stick(VIRTIO_MMIO_INT_VRING)
    for i in indices:
        q = active.queues[i]
        io.modify(q.notifier, 0)            # the server's from now on
        desc, avail, used = (mem.host_address_of(addr, n) for addr, n in q.ring_ranges())
        server.start_vring(i, q.size, q.next_avail, (desc, avail, used), q.notifier, active.interrupt.fd)


def take_back(server: RingServer | None, active: Active, io: EventLoop, indices: Iterable[int],
              name: str) -> None:
    """Stop ``server`` on queues ``indices`` (None: it is gone) and watch them here again,
    each from where the server left it."""
    for i in indices:
        q = active.queues[i]
        if server is not None:
            try:
                q.next_avail = server.stop_vring(i)
            except OSError as e:
                log.warning("%s: stopping queue %d: %s", name, i, e.strerror)
        io.modify(q.notifier, select.EPOLLIN)
    active.interrupt.stick(0)
