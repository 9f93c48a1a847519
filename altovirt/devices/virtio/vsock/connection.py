"""One vsock stream between a guest port and a host socket: its credit, what it owes the
guest, and the bytes it moves (Firecracker's csm/connection.rs).

Flow control is the spec's credit scheme (5.10.6.3): we send a connection no more than the
guest's buf_alloc minus what it has not yet consumed, and advertise our own buf_alloc and
fwd_cnt (bytes delivered to the host socket) so the guest never sends more than we can hold.
Payloads move between the socket and guest RAM without intermediate copies.

A connection does not watch its socket or queue itself for the guest's receive buffers: the
muxer does, from what these methods tell it. A connection's steps answer with what the guest
is owed now (``P_*`` bits, 0 for nothing new); ``P_SHUTDOWN`` or ``P_RST`` ends it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from ..queue import Queue, views_from, write_at
from .packet import (
    BUF_ALLOC,
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
    header,
    limit,
    rx_chain,
)

log = logging.getLogger(__package__)    # (the device's log lines keep the name they had)

# What a connection owes the guest (Conn.pending), in the order it goes out: the first three
# before the socket's bytes, then SHUTDOWN or RST, after which the connection is gone.
P_REQUEST, P_RESPONSE, P_CREDIT, P_SHUTDOWN, P_RST = 1, 2, 4, 8, 16
P_FIRST, P_LAST = P_REQUEST | P_RESPONSE | P_CREDIT, P_SHUTDOWN | P_RST
_P_OPS = ((P_REQUEST, OP_REQUEST, 0), (P_RESPONSE, OP_RESPONSE, 0), (P_CREDIT, OP_CREDIT_UPDATE, 0),
          (P_SHUTDOWN, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND), (P_RST, OP_RST, 0))


@dataclass
class Conn:
    """One stream: (host port, guest port) and both directions' credit."""

    host_port: int
    guest_port: int
    sock: socket.socket
    guest_cid: int
    device: str                     # the device's name, for log lines
    established: bool = False
    host_initiated: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0                 # bytes sent to the guest
    fwd_cnt: int = 0                # bytes from the guest delivered to the socket
    fwd_cnt_sent: int = 0           # the fwd_cnt the guest last heard from us
    out: bytearray = field(default_factory=bytearray)   # guest bytes the socket has not taken yet
    watching: int = -1              # epoll events currently registered (by the muxer)
    pending: int = 0                # control packets owed to the guest (P_*)
    readable: bool = False          # the socket has bytes for the guest (until a read would block)
    queued: bool = False            # in the muxer's RxQueue
    closed: bool = False            # no socket: here only until its SHUTDOWN or RST is sent

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def wants_rx(self) -> bool:
        return bool(self.pending) or (self.readable and self.peer_credit() > 0)

    # --- to the guest ---
    def send_pending(self, queue: Queue, mask: int) -> bool:
        """The control packets owed among ``mask``; False if the buffers ran out first."""
        for bit, op, flags in _P_OPS:
            if self.pending & mask & bit:
                chain = rx_chain(queue, 0)
                if chain is None:
                    return False
                self.pending &= ~bit
                self.fwd_cnt_sent = self.fwd_cnt
                write_at(chain.writable, 0, header(self.guest_cid, self.host_port, self.guest_port, op,
                                                   0, flags, self.fwd_cnt))
                queue.add_used(chain, HDR_SIZE)
        return True

    def stream_to_guest(self, queue: Queue) -> int | None:
        """Socket bytes straight into guest receive buffers, within the guest's credit, until
        a read would block (``readable`` is then False). None if the buffers ran out first;
        P_SHUTDOWN if the host side closed."""
        while self.readable:
            credit = self.peer_credit()
            if credit <= 0:                 # it waits, readable, for the guest's credit
                return 0
            chain = rx_chain(queue, 1)
            if chain is None:
                return None
            room = min(chain.writable_len - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            payload = limit(views_from(chain.writable, HDR_SIZE), room)
            try:
                n = self.sock.recvmsg_into(payload)[0]
            except BlockingIOError:
                queue.undo_pop()
                self.readable = False
                return 0
            except OSError:
                n = 0
            if n == 0:
                queue.undo_pop()
                return P_SHUTDOWN
            self.tx_cnt += n
            self.fwd_cnt_sent = self.fwd_cnt
            write_at(chain.writable, 0, header(self.guest_cid, self.host_port, self.guest_port, OP_RW,
                                               n, 0, self.fwd_cnt))
            queue.add_used(chain, HDR_SIZE + n)
        return 0

    # --- from the guest ---
    def receive(self, op: int, flags: int, length: int, payload: list[memoryview]) -> int:
        """A packet from the guest other than REQUEST and RST (the muxer's); what it is owed now."""
        if op == OP_RESPONSE and self.host_initiated and not self.established:
            self.established = True
            try:    # a few bytes into a fresh socket's empty buffer: this does not block
                self.sock.send(f"OK {self.host_port}\n".encode())
            except OSError:
                return P_SHUTDOWN
        elif op == OP_RW:
            data = limit(payload, length)
            size = sum(len(v) for v in data)
            if len(self.out) + size > BUF_ALLOC:
                log.warning("%s: guest overran its credit on port %d; resetting", self.device,
                            self.guest_port)
                return P_RST
            for v in data:
                self.out += v
            return self.flush()
        elif op == OP_CREDIT_REQUEST:
            return P_CREDIT
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_SEND and flags & SHUTDOWN_RCV:
                return P_RST
            if flags & SHUTDOWN_SEND:
                self.sock.shutdown(socket.SHUT_WR)
        return 0

    def flush(self) -> int:
        """Give the socket what the guest sent: P_SHUTDOWN if the socket is gone, P_CREDIT once
        the room we made is worth telling the guest about."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return 0
        except OSError:
            return P_SHUTDOWN
        del self.out[:sent]
        self.fwd_cnt += sent
        return P_CREDIT if self.fwd_cnt - self.fwd_cnt_sent >= BUF_ALLOC // 4 else 0

    def close(self, last: int) -> None:
        """Close the socket, which nothing watches any more. What the guest is still owed is
        ``last`` (P_SHUTDOWN or P_RST), or nothing: the connection is forgotten."""
        if not self.closed:
            self.closed, self.readable = True, False
            self.sock.close()
            self.out.clear()
        if last:
            # A RESPONSE still owed goes first, or the guest would take the SHUTDOWN for a
            # protocol error; an RST says all there is left to say.
            self.pending = last if last == P_RST else self.pending & P_RESPONSE | last
        else:
            self.pending = 0
