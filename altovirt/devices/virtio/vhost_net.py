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
from .device import COMMON_FEATURES, Active
from .net import VIRTIO_NET_F_MRG_RXBUF, Net
from .offload import hand_over, take_back

log = logging.getLogger(__name__)

# What the kernel must support for us to offer it; the offloads are the tap's business.
_RING_FEATURES = COMMON_FEATURES | 1 << VIRTIO_NET_F_MRG_RXBUF


class VhostNet(Net):
    def __init__(self, name: str, tap: Tap, mac: str, io: EventLoop, vhost: Vhost) -> None:
        super().__init__(name, tap, mac, io)
        self.vhost = vhost
        self._serving: Active | None = None     # what the kernel was handed

    def device_features(self) -> int:
        return super().device_features() & ~(_RING_FEATURES & ~self.vhost.features)

    def queue_notify(self, index: int) -> None:
        """Nothing to do: the kernel takes the notifications (the transport kicks it once
        more after activation, for buffers made available before)."""

    def _watch_tap(self) -> None:
        """The kernel serves the queues while the device is active and not broken."""
        want = self.active is not None and not self.broken
        if want and self._serving is None:
            try:
                self._start()
            except OSError as e:
                self._stop()
                self.fail(f"vhost-net refused the queues: {e.strerror}")
        elif not want and self._serving is not None:
            self._stop()

    def _start(self) -> None:
        assert self.active is not None and self.tap is not None
        active = self._serving = self.active
        mem, vhost = active.mem, self.vhost
        vhost.set_features(self.features & vhost.features)
        vhost.set_mem_table([(r.gpa, r.size, mem.host_address(r)) for r in mem.regions])
        hand_over(vhost, active, self.io, range(len(active.queues)))
        for i in range(len(active.queues)):
            vhost.set_backend(i, self.tap.fd)
        log.info("%s: vhost-net serves the queues", self.name)

    def _stop(self) -> None:
        active, self._serving = self._serving, None
        if active is None:
            return
        for i in range(len(active.queues)):
            try:
                self.vhost.set_backend(i, -1)
            except OSError as e:
                log.debug("%s: stopping vhost queue %d: %s", self.name, i, e.strerror)
        take_back(self.vhost, active, self.io, range(len(active.queues)), self.name)

    def prepare_save(self) -> None:
        from ...persist import SaveError
        raise SaveError(f"{self.name}: a vhost-net NIC cannot be saved yet (use vhost=off)")

    def detach(self) -> None:
        with self._lock:
            self._stop()
        super().detach()

    def close(self) -> None:
        super().close()
        self.vhost.close()
