"""virtio-vsock served by the host kernel (vhost-vsock, StratoVirt's and QEMU's
``vhost-vsock-device``): host programs reach the guest with AF_VSOCK sockets.

The guest sees the same device as :class:`~.vsock.Vsock` (device 19, its CID in
the configuration space); once the driver sets DRIVER_OK, the kernel takes the
receive and transmit queues, their notifications (the ioeventfds KVM signals)
and the interrupt (the irqfd), and no byte passes through Python (see
:mod:`.offload`). The event queue stays here: its buffers are only for a
transport reset, which is not sent (a vhost-vsock device cannot be saved yet).
The CID is the host's to give: KVM guests share one AF_VSOCK address space, so
a CID in use elsewhere is refused.
"""

from __future__ import annotations

import logging
import struct

from ...backends.vhost import Vhost
from .device import VIRTIO_ID_VSOCK
from .offload import Offload, OffloadedDevice
from .vsock import QUEUE_SIZE, RXQ, TXQ

log = logging.getLogger(__name__)


class VhostVsock(OffloadedDevice):
    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)       # rx, tx, event (virtio 1.2, 5.10.2)
    offloaded_queues = (RXQ, TXQ)
    refused = "vhost-vsock refused the queues: "
    cannot_save = "a vhost-vsock device cannot be saved yet (use -device vsock)"

    def __init__(self, name: str, guest_cid: int, vhost: Vhost) -> None:
        """``vhost`` has the CID set already (see :func:`open_vhost_vsock`)."""
        super().__init__(name)
        self.guest_cid = guest_cid
        self.config = bytearray(struct.pack("<Q", guest_cid))    # le64 guest_cid (5.10.4)
        self.vhost = vhost
        self.offload = Offload(vhost)

    def _enable_backend(self) -> None:
        self.vhost.set_running(True)

    def _disable_backend(self) -> None:
        try:
            self.vhost.set_running(False)
        except OSError as e:
            log.debug("%s: stopping vhost-vsock: %s", self.name, e.strerror)

    def _served_by(self) -> str:
        return f"vhost-vsock serves CID {self.guest_cid}"


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
