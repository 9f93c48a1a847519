"""virtio-vsock in userspace, with Firecracker's hybrid unix-socket model on the host side, in
the layers of Firecracker's devices/virtio/vsock: the virtio device (device.py) uses the muxer
(muxer.py, the host side), which owns the connections (connection.py) and queues them for the
guest's receive buffers (rxq.py); packet.py is the wire format."""

from .connection import Conn
from .device import EVENTQ, QUEUE_SIZE, RXQ, TXQ, Vsock
from .muxer import CONNECT_LINE_MAX, FIRST_HOST_PORT, MAX_CONNECTIONS
from .packet import (
    BUF_ALLOC,
    EVENT,
    HDR,
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
)
from .packet import HDR as _HDR  # (its name before the split)
from .rxq import RXQ_SIZE

__all__ = ["BUF_ALLOC", "CONNECT_LINE_MAX", "EVENT", "EVENTQ", "FIRST_HOST_PORT", "HDR", "HDR_SIZE",
           "MAX_CONNECTIONS", "MAX_PKT_PAYLOAD", "OP_CREDIT_REQUEST", "OP_CREDIT_UPDATE", "OP_REQUEST",
           "OP_RESPONSE", "OP_RST", "OP_RW", "OP_SHUTDOWN", "QUEUE_SIZE", "RXQ", "RXQ_SIZE", "SHUTDOWN_RCV",
           "SHUTDOWN_SEND", "TXQ", "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET", "VIRTIO_VSOCK_TYPE_STREAM",
           "VMADDR_CID_HOST", "_HDR", "Conn", "Vsock"]
