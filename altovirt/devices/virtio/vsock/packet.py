"""The vsock packet (VIRTIO 1.2, 5.10.6): its header and constants, the event queue's one
event, and the receive buffers packets for the guest are written to."""

from __future__ import annotations

import struct

from ..queue import DescriptorChain, Queue, QueueError

VMADDR_CID_HOST = 2
# struct virtio_vsock_hdr (5.10.6)
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
VIRTIO_VSOCK_TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
BUF_ALLOC = 256 << 10               # what we can hold per connection, guest to host: every header says so
MAX_PKT_PAYLOAD = 64 << 10
# The event queue's one event (5.10.6.6, Device Events): the driver drops every connection
# and reads the guest CID again.
EVENT = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0


def header(guest_cid: int, src_port: int, dst_port: int, op: int, length: int = 0, flags: int = 0,
           fwd_cnt: int = 0) -> bytes:
    """The header of a packet from the host to the guest."""
    return HDR.pack(VMADDR_CID_HOST, guest_cid, src_port, dst_port, length, VIRTIO_VSOCK_TYPE_STREAM, op,
                    flags, BUF_ALLOC, fwd_cnt)


def rx_chain(queue: Queue, payload: int) -> DescriptorChain | None:
    """The next receive buffer, with room for a header and ``payload`` bytes at least."""
    chain = queue.pop()
    if chain is not None and (chain.readable or chain.writable_len < HDR_SIZE + payload):
        raise QueueError("vsock receive buffer is not a writable header and payload")
    return chain


def limit(views: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views``."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out
