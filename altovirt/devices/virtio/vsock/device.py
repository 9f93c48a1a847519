"""virtio-vsock (VIRTIO 1.2, section 5.10) in userspace, with Firecracker's hybrid
unix-socket model on the host side. This is the virtio device (Firecracker's
vsock/device.rs): its three queues and config space (the guest's CID).

* Host to guest: a program connects to the device's unix socket (uds_path)
  and writes ``CONNECT <port>\\n``; the device sends the guest a REQUEST from
  the host (CID 2) and a fresh host port, and once the guest answers
  RESPONSE it writes ``OK <hostport>\\n`` back; from then on the socket is a
  byte stream to the guest port.
* Guest to host: a guest connection to CID 2 port P becomes a connection to
  the unix socket ``<uds_path>_P``; if nothing listens there, the guest gets RST.
  Ports given to :meth:`Vsock.serve` are answered inside the VMM instead
  (the XenStore's guest port).

The host side is the muxer's (muxer.py): the device hands it the guest's packets from the
transmit queue and its receive queue to fill, and has it end every connection, with a
transport reset event for the guest, when the device's state is saved.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable

from ....backends.unix import UnixListener
from ....eventloop import EventLoop
from ....memory import GuestMemory
from ..device import VIRTIO_ID_VSOCK, Interrupt, VirtioDevice
from ..queue import Queue, QueueError, views_from, write_at
from .muxer import Muxer
from .packet import EVENT, HDR, HDR_SIZE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, limit

log = logging.getLogger(__package__)    # (the device's log lines keep the name they had)

RXQ, TXQ, EVENTQ = 0, 1, 2
QUEUE_SIZE = 256


class Vsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name: str, guest_cid: int, listener: UnixListener, io: EventLoop) -> None:
        super().__init__(name)
        self.guest_cid = guest_cid
        self.config = bytearray(struct.pack("<Q", guest_cid))
        self.listener = listener
        self.uds_path = listener.path
        self.io = io
        self.muxer = Muxer(name, guest_cid, listener, io, self._deliver)

    def serve(self, port: int, connect: Callable[[], socket.socket]) -> None:
        """Answer guest connections to host port ``port`` with ``connect()``: a connected,
        non-blocking stream socket (OSError refuses the guest) instead of ``<uds_path>_port``."""
        self.muxer.serve(port, connect)

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        with self.muxer.lock:
            super().activate(mem, queues, interrupt, io)

    def queue_notify(self, index: int) -> None:
        with self.muxer.lock:
            if index == TXQ:
                self.counters["tx_queue_event_count"] += 1
                self._transmit()
            elif index == RXQ:
                self.counters["rx_queue_event_count"] += 1
            self._deliver()

    def _deliver(self) -> None:
        """What the muxer has for the guest into its receive buffers (also when the muxer's
        sockets have something for it, on the I/O thread)."""
        active = self.active
        if active is None or self.broken:
            return
        queue = active.queues[RXQ]
        used = queue.next_used
        try:
            self.muxer.fill(queue)
        except QueueError as e:
            self.fail(str(e))
            return
        if queue.next_used != used:
            self.counters["rx_packets_count"] += (queue.next_used - used) & 0xFFFF
            active.interrupt.signal_used(queue)

    def _transmit(self) -> None:
        assert self.active is not None
        queue, interrupt, packet = self.active.queues[TXQ], self.active.interrupt, self.muxer.packet
        used = False
        for chain in self.chains(queue):
            header = b"".join(bytes(v) for v in limit(chain.readable, HDR_SIZE))
            if chain.writable or len(header) < HDR_SIZE:
                self.fail("vsock transmit chain is not a device-readable header and payload")
                return
            payload = views_from(chain.readable, HDR_SIZE)
            packet(HDR.unpack(header), payload)
            queue.add_used(chain, 0)
            self.counters["tx_packets_count"] += 1
            self.counters["tx_bytes_count"] += sum(len(v) for v in payload)
            used = True
        if used:
            interrupt.signal_used(queue)

    def prepare_save(self) -> None:
        """Connections end here, with a transport reset, as in Firecracker: their host sockets
        cannot move with the guest, and the event in the saved rings tells the restored guest too."""
        with self.muxer.lock:
            self.muxer.drop_all()
            self.connections_lost()

    def connections_lost(self) -> None:
        """The host ends of the guest's connections are not here (a forked VM's, whose parent
        keeps them): the guest hears a transport reset, as after a restore."""
        with self.muxer.lock:
            if self.active is not None and not self.broken:
                self._transport_reset(self.active.queues[EVENTQ], self.active.interrupt)

    def _transport_reset(self, queue: Queue, interrupt: Interrupt) -> None:
        chain = next(self.chains(queue), None)
        if chain is None:
            if not self.broken:
                log.warning("%s: no event buffer for the transport reset; guest connections stay "
                            "open until they time out", self.name)
            return
        if chain.readable or chain.writable_len < EVENT.size:
            self.fail("vsock event buffer is not 4 device-writable bytes")
            return
        write_at(chain.writable, 0, EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
        queue.add_used(chain, EVENT.size)
        interrupt.signal_used(queue)

    def reset(self) -> None:
        with self.muxer.lock:
            self.muxer.drop_all()
            super().reset()

    def close(self) -> None:
        with self.muxer.lock:
            self.muxer.close()
