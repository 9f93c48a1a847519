"""virtio-fs through a vhost-user back end (StratoVirt's and QEMU's ``vhost-user-fs-device``):
a host directory the guest mounts with ``mount -t virtiofs TAG DIR``.

The back end (QEMU's virtiofsd) serves the FUSE requests the driver puts on the
queues, straight from guest RAM, which it maps from the memfd of ``mem-share=on``;
the queue notifications (the ioeventfds KVM signals) and the interrupt (the irqfd)
go to and from it without passing through Python. AltoVirt only starts and stops
the queues (DRIVER_OK, reset: see :mod:`.offload`) and watches the connection: a
back end that goes away or sends what it was not asked for stops this device
(NEEDS_RESET), and the VM runs on.
"""

from __future__ import annotations

import struct

from ...backends.vhost_user import VhostUser
from ...eventloop import EventLoop
from .offload import Offload, OffloadedDevice

VIRTIO_ID_FS = 26               # virtio 1.2, 5.11
TAG_SIZE = 36                   # struct virtio_fs_config: char tag[36]; le32 num_request_queues
QUEUE_SIZE = 128                # QEMU's vhost-user-fs default
REQUEST_QUEUES = 1              # queue 0 is hiprio, then the request queues (5.11.2)


class VhostUserFs(OffloadedDevice):
    device_id = VIRTIO_ID_FS
    queue_sizes = (QUEUE_SIZE,) * (1 + REQUEST_QUEUES)
    offloaded_queues = tuple(range(1 + REQUEST_QUEUES))
    # A refusal is the back end's own message (VhostUserError: "vhost-user back end PATH: ...").
    cannot_save = "a virtio-fs device cannot be saved (its state is the back end's)"

    def __init__(self, name: str, tag: str, backend: VhostUser, io: EventLoop) -> None:
        super().__init__(name)
        self.config = bytearray(tag.encode().ljust(TAG_SIZE, b"\0") + struct.pack("<I", REQUEST_QUEUES))
        self.backend = backend
        self.offload = Offload(backend)
        self._watch_backend(io, f"the vhost-user back end at {backend.path} went away")

    def _served_by(self) -> str:
        return f"the vhost-user back end at {self.backend.path} serves the queues"
