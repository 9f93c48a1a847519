"""virtio-net with its queues served by the host kernel (vhost-net, QEMU's ``vhost=on``).

The device is a :class:`~.net.Net` to the guest (same configuration space,
MAC, link and offloads, the tap set up the same way); once the driver sets
DRIVER_OK, the kernel takes the rings, the queue notifications (the
ioeventfds KVM signals) and the interrupt (the irqfd), and frames go between
the tap and guest RAM without passing through Python (see :mod:`.offload`).
"""

from __future__ import annotations

import logging

from ...backends.tap import Tap
from ...backends.vhost import Vhost
from ...eventloop import EventLoop
from .device import COMMON_FEATURES
from .net import RXQ, TXQ, VIRTIO_NET_F_MRG_RXBUF, Net
from .offload import Offload, OffloadedDevice

log = logging.getLogger(__name__)


class VhostNet(OffloadedDevice, Net):
    offloaded_queues = (RXQ, TXQ)
    # What the kernel must support for us to offer it; the offloads are the tap's business.
    ring_features = COMMON_FEATURES | 1 << VIRTIO_NET_F_MRG_RXBUF
    refused = "vhost-net refused the queues: "
    cannot_save = "a vhost-net NIC cannot be saved yet (use vhost=off)"

    def __init__(self, name: str, tap: Tap, mac: str | None, io: EventLoop, vhost: Vhost) -> None:
        super().__init__(name, tap, mac, io)
        self.vhost = vhost
        self.offload = Offload(vhost)

    def unplugged(self) -> None:
        """The tap stays with its netdev, but the vhost-net instance is this device's own."""
        self._unwatch_backend()
        self.offload.backend.close()

    def _watch_tap(self) -> None:
        """Never: the kernel reads and writes the tap."""

    def _enable_backend(self) -> None:
        assert self.tap is not None             # a vhost-net NIC is never an empty slot
        for i in self.offloaded_queues:
            self.vhost.set_backend(i, self.tap.fd)

    def _disable_backend(self) -> None:
        for i in self.offloaded_queues:
            try:
                self.vhost.set_backend(i, -1)
            except OSError as e:
                log.debug("%s: stopping vhost queue %d: %s", self.name, i, e.strerror)

    def _served_by(self) -> str:
        return "vhost-net serves the queues"
