"""virtio-vsock served by the host kernel (vhost-vsock, StratoVirt's and QEMU's
``vhost-vsock-device``): host programs reach the guest with AF_VSOCK sockets.

The guest sees the same device as :class:`~.vsock.Vsock` (device 19, its CID in
the configuration space); once the driver sets DRIVER_OK, the kernel takes the
receive and transmit queues, their notifications (the ioeventfds KVM signals)
and the interrupt (the irqfd), and no byte passes through Python. The event
queue stays here: its buffers are only for a transport reset, which is not sent
(a vhost-vsock device cannot be saved yet). The CID is the host's to give: KVM
guests share one AF_VSOCK address space, so a CID in use elsewhere is refused.
"""

from __future__ import annotations

import logging
import struct

from ...backends.vhost import Vhost
from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import COMMON_FEATURES, VIRTIO_ID_VSOCK, Active, Interrupt, VirtioDevice
from .offload import hand_over, take_back
from .queue import Queue
from .vsock import QUEUE_SIZE, RXQ, TXQ

log = logging.getLogger(__name__)


class VhostVsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)       # rx, tx, event (virtio 1.2, 5.10.2)

    def __init__(self, name: str, guest_cid: int, vhost: Vhost) -> None:
        """``vhost`` has the CID set already (see :func:`open_vhost_vsock`)."""
        super().__init__(name)
        self.guest_cid = guest_cid
        self.config = bytearray(struct.pack("<Q", guest_cid))    # le64 guest_cid (5.10.4)
        self.vhost = vhost
        self._io: EventLoop | None = None
        self._serving: Active | None = None

    def device_features(self) -> int:
        return COMMON_FEATURES & self.vhost.features

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        self._io = io
        try:
            self._start()
        except OSError as e:
            self._stop()
            self.fail(f"vhost-vsock refused the queues: {e.strerror}")

    def queue_notify(self, index: int) -> None:
        """The event queue's buffers wait here; the kernel takes the other notifications."""

    def reset(self) -> None:
        self._stop()
        super().reset()

    def _start(self) -> None:
        assert self.active is not None and self._io is not None
        active = self._serving = self.active
        mem, vhost = active.mem, self.vhost
        vhost.set_features(self.features & vhost.features)
        vhost.set_mem_table([(r.gpa, r.size, mem.host_address(r)) for r in mem.regions])
        hand_over(vhost, active, self._io, (RXQ, TXQ))
        vhost.set_running(True)
        log.info("%s: vhost-vsock serves CID %d", self.name, self.guest_cid)

    def _stop(self) -> None:
        active, self._serving = self._serving, None
        if active is None or self._io is None:
            return
        try:
            self.vhost.set_running(False)
        except OSError as e:
            log.debug("%s: stopping vhost-vsock: %s", self.name, e.strerror)
        take_back(self.vhost, active, self._io, (RXQ, TXQ), self.name)

    def prepare_save(self) -> None:
        from ...persist import SaveError
        raise SaveError(f"{self.name}: a vhost-vsock device cannot be saved yet (use -device vsock)")

    def detach(self) -> None:
        self._stop()

    def close(self) -> None:
        super().close()
        self.vhost.close()


def open_vhost_vsock(guest_cid: int, fd: int | None = None) -> Vhost:
    """/dev/vhost-vsock (or ``fd``, opened by the caller) with the guest's CID claimed.
    BackendError if the device is missing or the CID is taken on this host."""
    from ...backends import BackendError
    from ...backends.vhost import VSOCK_DEVICE
    vhost = Vhost(VSOCK_DEVICE, fd)
    try:
        vhost.set_guest_cid(guest_cid)
    except OSError as e:
        vhost.close()
        raise BackendError(e.errno, f"guest-cid {guest_cid}: {e.strerror} "
                                    "(another VM on this host has it?)") from e
    return vhost
