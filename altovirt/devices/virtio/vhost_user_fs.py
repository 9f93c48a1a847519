"""virtio-fs through a vhost-user back end (StratoVirt's and QEMU's ``vhost-user-fs-device``):
a host directory the guest mounts with ``mount -t virtiofs TAG DIR``.

The back end (QEMU's virtiofsd) serves the FUSE requests the driver puts on the
queues, straight from guest RAM, which it maps from the memfd of ``mem-share=on``;
the queue notifications (the ioeventfds KVM signals) and the interrupt (the irqfd)
go to and from it without passing through Python. AltoVirt only starts and stops
the queues (DRIVER_OK, reset) and watches the connection: a back end that goes
away or sends what it was not asked for stops this device (NEEDS_RESET), and the
VM runs on.
"""

from __future__ import annotations

import logging
import select
import struct

from ...backends.vhost_user import VhostUser, VhostUserError
from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import COMMON_FEATURES, Active, Interrupt, VirtioDevice
from .offload import hand_over, take_back
from .queue import Queue

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26               # virtio 1.2, 5.11
TAG_SIZE = 36                   # struct virtio_fs_config: char tag[36]; le32 num_request_queues
QUEUE_SIZE = 128                # QEMU's vhost-user-fs default
REQUEST_QUEUES = 1              # queue 0 is hiprio, then the request queues (5.11.2)


class VhostUserFs(VirtioDevice):
    device_id = VIRTIO_ID_FS
    queue_sizes = (QUEUE_SIZE,) * (1 + REQUEST_QUEUES)

    def __init__(self, name: str, tag: str, backend: VhostUser, io: EventLoop) -> None:
        super().__init__(name)
        self.config = bytearray(tag.encode().ljust(TAG_SIZE, b"\0") + struct.pack("<I", REQUEST_QUEUES))
        self.backend = backend
        self._io = io
        self._serving: Active | None = None
        # The connection is watched for its end (what it says comes only as replies, read by
        # whoever asked; anything else fails the next request).
        io.add(backend.fd, self._backend_gone, select.EPOLLRDHUP)
        self._watched = True

    def device_features(self) -> int:
        return COMMON_FEATURES & self.backend.features

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        try:
            self._start()
        except OSError as e:                # VhostUserError among them
            self._stop()
            self.fail(e.strerror or str(e))

    def queue_notify(self, index: int) -> None:
        """Nothing to do: the back end takes the notifications."""

    def reset(self) -> None:
        self._stop()
        super().reset()

    def _start(self) -> None:
        assert self.active is not None
        active = self._serving = self.active
        mem, backend = active.mem, self.backend
        if mem.fd is None:
            raise VhostUserError(0, "guest RAM is not shared (-machine mem-share=on)")
        backend.set_features(self.features)
        backend.set_mem_table([(r.gpa, r.size, mem.host_address(r), r.offset) for r in mem.regions], mem.fd)
        hand_over(backend, active, self._io, range(len(active.queues)))
        log.info("%s: the vhost-user back end at %s serves the queues", self.name, backend.path)

    def _stop(self) -> None:
        active, self._serving = self._serving, None
        if active is not None:
            take_back(None if self.broken else self.backend, active, self._io, range(len(active.queues)),
                      self.name)

    def _backend_gone(self) -> None:
        """I/O thread: the back end closed the connection."""
        self._io.remove(self.backend.fd)
        self._watched = False
        self.fail(f"the vhost-user back end at {self.backend.path} went away")

    def prepare_save(self) -> None:
        from ...persist import SaveError
        raise SaveError(f"{self.name}: a virtio-fs device cannot be saved (its state is the back end's)")

    def detach(self) -> None:
        self._stop()

    def close(self) -> None:
        super().close()
        if self._watched:
            self._io.remove(self.backend.fd)
            self._watched = False
        self.backend.close()
