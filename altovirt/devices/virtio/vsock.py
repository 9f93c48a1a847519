"""virtio-vsock (VIRTIO 1.2, section 5.10) in userspace, with Firecracker's hybrid
unix-socket model on the host side.

* Host to guest: a program connects to the device's unix socket (uds_path)
  and writes ``CONNECT <port>\\n``; the device sends the guest a REQUEST from
  the host (CID 2) and a fresh host port, and once the guest answers
  RESPONSE it writes ``OK <hostport>\\n`` back; from then on the socket is a
  byte stream to the guest port.
* Guest to host: a guest connection to CID 2 port P becomes a connection to
  the unix socket ``<uds_path>_P``; if nothing listens there, the guest gets RST.
  Ports given to :meth:`Vsock.serve` are answered inside the VMM instead
  (the XenStore's guest port).

Flow control is the spec's credit scheme (5.10.6.3): we send a connection
no more than the guest's buf_alloc minus what it has not yet consumed, and
advertise our own buf_alloc and fwd_cnt (bytes delivered to the host socket)
so the guest never sends more than we can hold. Payloads move between the
sockets and guest RAM without intermediate copies.

What the guest can make us hold is bounded, as in Firecracker's muxer: at most
MAX_CONNECTIONS connections (more are refused with RST), and what waits for
the guest's receive buffers is a queue of at most RXQ_SIZE entries, each a
connection with something to say (its control packets are flags on it, built
when sent) or an RST for a packet of no connection. A full queue goes out of
sync: once drained, it is refilled by a walk of the connections; an RST that
finds it full of RSTs is dropped (the guest's packet went nowhere, and its
connect or send times out).
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ...backends.unix import UnixListener
from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import VIRTIO_ID_VSOCK, Interrupt, VirtioDevice
from .queue import DescriptorChain, Queue, QueueError, views_from, write_at

log = logging.getLogger(__name__)

RXQ, TXQ, EVENTQ = 0, 1, 2
QUEUE_SIZE = 256
VMADDR_CID_HOST = 2
# struct virtio_vsock_hdr (5.10.6)
_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size
VIRTIO_VSOCK_TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
BUF_ALLOC = 256 << 10               # what we can hold per connection, guest to host
MAX_PKT_PAYLOAD = 64 << 10
FIRST_HOST_PORT = 1 << 30           # host-side ports we hand out for host-initiated connections
CONNECT_LINE_MAX = 64
# The event queue's one event (5.10.6.6, Device Events): the driver drops every connection
# and reads the guest CID again.
_EVENT = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
# (Firecracker's muxer: MUXER_RXQ_SIZE and MAX_CONNECTIONS, in vsock/unix/mod.rs's defs)
RXQ_SIZE = 256                      # entries waiting for the guest's receive buffers
MAX_CONNECTIONS = 1023              # guest- and host-initiated, with those still saying goodbye
# What a connection owes the guest (Conn.pending), in the order it goes out: the first three
# before the socket's bytes, then SHUTDOWN or RST, after which the connection is gone.
_P_REQUEST, _P_RESPONSE, _P_CREDIT, _P_SHUTDOWN, _P_RST = 1, 2, 4, 8, 16
_P_FIRST, _P_LAST = _P_REQUEST | _P_RESPONSE | _P_CREDIT, _P_SHUTDOWN | _P_RST
_P_OPS = ((_P_REQUEST, OP_REQUEST, 0), (_P_RESPONSE, OP_RESPONSE, 0), (_P_CREDIT, OP_CREDIT_UPDATE, 0),
          (_P_SHUTDOWN, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND), (_P_RST, OP_RST, 0))


@dataclass
class Conn:
    """One stream: (host port, guest port) and both directions' credit."""

    host_port: int
    guest_port: int
    sock: socket.socket
    established: bool = False
    host_initiated: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0                 # bytes sent to the guest
    fwd_cnt: int = 0                # bytes from the guest delivered to the socket
    fwd_cnt_sent: int = 0           # the fwd_cnt the guest last heard from us
    out: bytearray = field(default_factory=bytearray)   # guest bytes the socket has not taken yet
    watching: int = -1              # epoll events currently registered
    pending: int = 0                # control packets owed to the guest (_P_*)
    readable: bool = False          # the socket has bytes for the guest (until a read would block)
    queued: bool = False            # in Vsock._rxq
    closed: bool = False            # no socket: here only until its SHUTDOWN or RST is sent

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def wants_rx(self) -> bool:
        return bool(self.pending) or (self.readable and self.peer_credit() > 0)


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
        self._lock = threading.RLock()
        self._conns: dict[tuple[int, int], Conn] = {}
        self._handshakes: dict[int, tuple[socket.socket, bytearray]] = {}
        # What waits for guest receive buffers: connections, and (host port, guest port) RSTs.
        self._rxq: collections.deque[Conn | tuple[int, int]] = collections.deque()
        self._rxq_synced = True         # every connection with something to say is in _rxq
        self._rxq_rsts = 0              # how many entries of _rxq are RSTs
        self._rsts_dropped = 0
        self._scan_from = 0             # where the next walk of the connections starts
        self._full_warned = False
        self._next_port = FIRST_HOST_PORT
        self._services: dict[int, Callable[[], socket.socket]] = {}
        io.add(listener.fileno(), self._accept)

    def serve(self, port: int, connect: Callable[[], socket.socket]) -> None:
        """Answer guest connections to host port ``port`` with ``connect()``: a connected,
        non-blocking stream socket (OSError refuses the guest) instead of ``<uds_path>_port``."""
        self._services[port] = connect

    # --- packets to the guest ---
    def _header(self, conn: Conn | None, op: int, *, src_port: int = 0, dst_port: int = 0,
                length: int = 0, flags: int = 0) -> bytes:
        if conn is not None:
            src_port, dst_port = conn.host_port, conn.guest_port
            conn.fwd_cnt_sent = conn.fwd_cnt
        fwd = conn.fwd_cnt if conn else 0
        return _HDR.pack(VMADDR_CID_HOST, self.guest_cid, src_port, dst_port, length,
                         VIRTIO_VSOCK_TYPE_STREAM, op, flags, BUF_ALLOC, fwd)

    def _want(self, conn: Conn, bits: int) -> None:
        conn.pending |= bits
        self._schedule(conn)

    def _schedule(self, conn: Conn) -> None:
        """Queue ``conn``, which has something for the guest. A full queue does not grow: it
        goes out of sync, and ``conn`` is found by the walk that refills it (Firecracker's
        muxer: MuxerRxQ::push of a ConnRx)."""
        if conn.queued:
            return
        if self._rxq_synced and len(self._rxq) < RXQ_SIZE:
            self._rxq.append(conn)
            conn.queued = True
        else:
            self._rxq_synced = False

    def _refuse(self, host_port: int, guest_port: int) -> None:
        """Queue an RST for a guest packet of no connection. It has no other home: in a full
        queue it takes the place of the newest connection entry (the queue goes out of sync),
        and it is dropped if there is none (Firecracker's muxer: MuxerRxQ::push of an RstPkt)."""
        rxq = self._rxq
        if len(rxq) >= RXQ_SIZE:
            if self._rxq_rsts >= len(rxq):
                if not self._rsts_dropped:
                    log.warning("%s: %d packets wait for the guest's receive buffers; dropping RSTs",
                                self.name, len(rxq))
                self._rsts_dropped += 1
                return
            for i in range(len(rxq) - 1, -1, -1):
                entry = rxq[i]
                if isinstance(entry, Conn):
                    entry.queued, self._rxq_synced = False, False
                    rxq[i] = (host_port, guest_port)
                    break
        else:
            rxq.append((host_port, guest_port))
        self._rxq_rsts += 1

    def _resync(self) -> None:
        """Refill the drained, out-of-sync queue with the connections that have something for
        the guest; it stays out of sync if they do not all fit (Firecracker's muxer:
        MuxerRxQ::from_conn_map). The walk starts where the last one stopped, so that no
        connection waits behind the same RXQ_SIZE others every time."""
        conns = list(self._conns.values())
        self._rxq_synced = True
        start = self._scan_from % len(conns) if conns else 0
        for i in range(len(conns)):
            conn = conns[(start + i) % len(conns)]
            if conn.wants_rx():
                if len(self._rxq) >= RXQ_SIZE:
                    self._rxq_synced, self._scan_from = False, start + i
                    return
                self._rxq.append(conn)
                conn.queued = True

    def _deliver(self) -> None:
        """The queue's entries into guest receive buffers, in order, while there are buffers."""
        active = self.active
        if active is None or self.broken:
            return
        queue, rxq = active.queues[RXQ], self._rxq
        used = queue.next_used
        try:
            while rxq or not self._rxq_synced:
                if not rxq:
                    self._resync()
                    if not rxq:
                        break
                entry = rxq[0]
                if isinstance(entry, Conn):
                    if not self._serve(entry, queue):
                        break
                    entry.queued = False
                else:
                    chain = _rx_chain(queue, 0)
                    if chain is None:
                        break
                    write_at(chain.writable, 0, self._header(None, OP_RST, src_port=entry[0],
                                                             dst_port=entry[1]))
                    queue.add_used(chain, HDR_SIZE)
                    self._rxq_rsts -= 1
                rxq.popleft()
        except QueueError as e:
            self.fail(str(e))
            return
        if not rxq and self._rsts_dropped:
            log.warning("%s: dropped %d RSTs for the guest", self.name, self._rsts_dropped)
            self._rsts_dropped = 0
        if queue.next_used != used:
            active.interrupt.signal_used(queue)

    def _serve(self, conn: Conn, queue: Queue) -> bool:
        """Give the guest what ``conn`` has for it: control packets, the socket's bytes, then
        its SHUTDOWN or RST, after which it is forgotten. False if the buffers ran out first."""
        if conn.pending & _P_FIRST and not self._send_pending(conn, queue, _P_FIRST):
            return False
        if conn.readable and not self._stream_to_guest(conn, queue):
            return False
        if conn.pending & _P_LAST:
            if not self._send_pending(conn, queue, _P_LAST):
                return False
            self._forget(conn)
        return True

    def _send_pending(self, conn: Conn, queue: Queue, mask: int) -> bool:
        for bit, op, flags in _P_OPS:
            if conn.pending & mask & bit:
                chain = _rx_chain(queue, 0)
                if chain is None:
                    return False
                conn.pending &= ~bit
                write_at(chain.writable, 0, self._header(conn, op, flags=flags))
                queue.add_used(chain, HDR_SIZE)
        return True

    def _stream_to_guest(self, conn: Conn, queue: Queue) -> bool:
        """Socket bytes straight into guest receive buffers, within the guest's credit, until
        a read would block; False if the buffers ran out first."""
        while conn.readable:
            credit = conn.peer_credit()
            if credit <= 0:                 # it waits, readable, for the guest's credit
                return True
            chain = _rx_chain(queue, 1)
            if chain is None:
                return False
            room = min(chain.writable_len - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            payload = _limit(views_from(chain.writable, HDR_SIZE), room)
            try:
                n = conn.sock.recvmsg_into(payload)[0]
            except BlockingIOError:
                queue.undo_pop()
                conn.readable = False
                self._watch(conn)
                return True
            except OSError:
                n = 0
            if n == 0:                      # the host side closed: tell the guest, then forget it
                queue.undo_pop()
                self._close(conn, _P_SHUTDOWN)
                return True
            conn.tx_cnt += n
            write_at(chain.writable, 0, self._header(conn, OP_RW, length=n))
            queue.add_used(chain, HDR_SIZE + n)
        return True

    def _watch(self, conn: Conn) -> None:
        """Wait for the socket's bytes while the guest has credit for them and we do not know of
        some already; for room in it while guest bytes wait."""
        if conn.closed:
            return
        events = 0
        if conn.established and not conn.readable and conn.peer_credit() > 0:
            events |= select.EPOLLIN
        if conn.out:
            events |= select.EPOLLOUT
        if events == conn.watching:
            return
        if conn.watching < 0:
            self.io.add(conn.sock.fileno(), functools.partial(self._conn_ready, conn), events)
        else:
            self.io.modify(conn.sock.fileno(), events)
        conn.watching = events

    # --- host sockets (I/O thread) ---
    def _accept(self) -> None:
        sock = self.listener.accept()
        if sock is None:
            return
        with self._lock:
            if len(self._conns) + len(self._handshakes) >= MAX_CONNECTIONS:
                # (Firecracker's muxer: a host connection beyond MAX_CONNECTIONS is accepted and closed)
                log.warning("%s: %d connections; refusing a host client", self.name, len(self._conns))
                sock.close()
                return
            self._handshakes[sock.fileno()] = (sock, bytearray())
            self.io.add(sock.fileno(), functools.partial(self._handshake, sock))

    def _handshake(self, sock: socket.socket) -> None:
        """Read "CONNECT <port>\\n" from a new host client."""
        with self._lock:
            fd = sock.fileno()
            _, line = self._handshakes[fd]
            try:
                data = sock.recv(CONNECT_LINE_MAX - len(line))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            line += data
            if not data or (b"\n" not in line and len(line) >= CONNECT_LINE_MAX):
                self._end_handshake(sock, close=True)
                return
            if b"\n" not in line:
                return
            words = bytes(line).split(b"\n", 1)[0].split()
            if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
                log.info("%s: bad handshake %r from a host client", self.name, bytes(line[:40]))
                self._end_handshake(sock, close=True)
                return
            self._end_handshake(sock, close=False)
            conn = Conn(self._new_port(), int(words[1]), sock, host_initiated=True)
            self._conns[(conn.host_port, conn.guest_port)] = conn
            self._want(conn, _P_REQUEST)
            self._deliver()

    def _end_handshake(self, sock: socket.socket, close: bool) -> None:
        self.io.remove(sock.fileno())
        del self._handshakes[sock.fileno()]
        if close:
            sock.close()

    def _new_port(self) -> int:
        while any(p == self._next_port for p, _ in self._conns):
            self._next_port += 1
        port, self._next_port = self._next_port, self._next_port + 1
        return port

    def _conn_ready(self, conn: Conn) -> None:
        with self._lock:
            if conn.closed:
                return
            if conn.out and not self._flush(conn):
                return
            if conn.watching & select.EPOLLIN:  # (or EPOLLOUT only: then a read finds nothing)
                conn.readable = True
                self._schedule(conn)
            self._deliver()
            self._watch(conn)   # EPOLLIN off only if bytes are left (no buffer or credit for them)

    def _flush(self, conn: Conn) -> bool:
        """Give the socket what the guest sent; False if the socket is gone."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return True
        except OSError:
            self._close(conn, _P_SHUTDOWN)
            return False
        del conn.out[:sent]
        conn.fwd_cnt += sent
        # Tell the guest about the room we made once it is worth a packet.
        if conn.fwd_cnt - conn.fwd_cnt_sent >= BUF_ALLOC // 4:
            self._want(conn, _P_CREDIT)
        return True

    def _close(self, conn: Conn, last: int = 0) -> None:
        """Close the host socket. With ``last`` (_P_SHUTDOWN or _P_RST) the connection stays,
        counted, until that packet reaches the guest (Firecracker's muxer: a connection leaves
        the pool with its RST); without, it is forgotten now."""
        if not conn.closed:
            conn.closed, conn.readable = True, False
            if conn.watching >= 0:
                self.io.remove(conn.sock.fileno())
            conn.sock.close()
            conn.out.clear()
        if last:
            # A RESPONSE still owed goes first, or the guest would take the SHUTDOWN for a
            # protocol error; an RST says all there is left to say.
            conn.pending = last if last == _P_RST else conn.pending & _P_RESPONSE | last
            self._schedule(conn)
        else:
            conn.pending = 0
            self._forget(conn)

    def _forget(self, conn: Conn) -> None:
        key = (conn.host_port, conn.guest_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._full_warned = False

    # --- packets from the guest (I/O thread) ---
    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        with self._lock:
            super().activate(mem, queues, interrupt, io)

    def queue_notify(self, index: int) -> None:
        with self._lock:
            if index == TXQ:
                self._transmit()
            self._deliver()

    def _transmit(self) -> None:
        assert self.active is not None
        queue, interrupt = self.active.queues[TXQ], self.active.interrupt
        used = False
        for chain in self.chains(queue):
            header = b"".join(bytes(v) for v in _limit(chain.readable, HDR_SIZE))
            if chain.writable or len(header) < HDR_SIZE:
                self.fail("vsock transmit chain is not a device-readable header and payload")
                return
            self._packet(_HDR.unpack(header), views_from(chain.readable, HDR_SIZE))
            queue.add_used(chain, 0)
            used = True
        if used:
            interrupt.signal_used(queue)

    def _packet(self, hdr: tuple[int, ...], payload: list[memoryview]) -> None:
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = hdr
        if src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST or kind != VIRTIO_VSOCK_TYPE_STREAM:
            log.debug("%s: dropping a packet %d:%d -> %d:%d", self.name, src_cid, src_port, dst_cid, dst_port)
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is not None and conn.closed:   # its SHUTDOWN or RST is on the way
            if op == OP_RST:
                self._close(conn)
            return
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            if conn is None:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            return
        if conn is None:
            if op != OP_RST:
                self._refuse(dst_port, src_port)
            return
        if op == OP_RESPONSE and conn.host_initiated and not conn.established:
            conn.established = True
            try:    # a few bytes into a fresh socket's empty buffer: this does not block
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._close(conn, _P_SHUTDOWN)
                return
        elif op == OP_RW:
            data = _limit(payload, length)
            size = sum(len(v) for v in data)
            if len(conn.out) + size > BUF_ALLOC:
                log.warning("%s: guest overran its credit on port %d; resetting", self.name, src_port)
                self._close(conn, _P_RST)
                return
            for v in data:
                conn.out += v
            if not self._flush(conn):
                return
        elif op == OP_CREDIT_REQUEST:
            self._want(conn, _P_CREDIT)
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_SEND and flags & SHUTDOWN_RCV:
                self._close(conn, _P_RST)
                return
            if flags & SHUTDOWN_SEND:
                conn.sock.shutdown(socket.SHUT_WR)
        elif op == OP_RST:
            self._close(conn)
            return
        if conn.readable and conn.peer_credit() > 0:    # credit came back for waiting bytes
            self._schedule(conn)
        self._watch(conn)

    def _guest_connect(self, guest_port: int, host_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            # (Firecracker's muxer: add_connection fails with TooManyConnections, the guest gets RST)
            if not self._full_warned:
                log.warning("%s: %d connections; refusing the guest's new ones", self.name, len(self._conns))
                self._full_warned = True
            self._refuse(host_port, guest_port)
            return
        try:
            service = self._services.get(host_port)
            sock = service() if service else _connect_unix(f"{self.uds_path}_{host_port}")
        except OSError as e:
            log.info("%s: guest port %d -> host port %d refused (%s)", self.name, guest_port, host_port,
                     errno.errorcode.get(e.errno or 0, e))
            self._refuse(host_port, guest_port)
            return
        conn = Conn(host_port, guest_port, sock, established=True, peer_buf_alloc=buf_alloc,
                    peer_fwd_cnt=fwd_cnt)
        self._conns[(host_port, guest_port)] = conn
        self._want(conn, _P_RESPONSE)
        self._watch(conn)

    def _drop_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self._rxq.clear()
        self._rxq_synced, self._rxq_rsts, self._rsts_dropped = True, 0, 0

    def prepare_save(self) -> None:
        """Connections end here, with a transport reset, as in Firecracker: their host sockets
        cannot move with the guest, and the event in the saved rings tells the restored guest too."""
        with self._lock:
            self._drop_all()
            if self.active is not None and not self.broken:
                self._transport_reset(self.active.queues[EVENTQ], self.active.interrupt)

    def _transport_reset(self, queue: Queue, interrupt: Interrupt) -> None:
        chain = next(self.chains(queue), None)
        if chain is None:
            if not self.broken:
                log.warning("%s: no event buffer for the transport reset; guest connections stay "
                            "open until they time out", self.name)
            return
        if chain.readable or chain.writable_len < _EVENT.size:
            self.fail("vsock event buffer is not 4 device-writable bytes")
            return
        write_at(chain.writable, 0, _EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
        queue.add_used(chain, _EVENT.size)
        interrupt.signal_used(queue)

    def reset(self) -> None:
        with self._lock:
            self._drop_all()
            super().reset()

    def close(self) -> None:
        with self._lock:
            self._drop_all()
            for sock, _ in list(self._handshakes.values()):
                self._end_handshake(sock, close=True)
            self.io.remove(self.listener.fileno())
            self.listener.close()


def _connect_unix(path: str) -> socket.socket:
    # Non-blocking: a unix connect then completes or fails at once, EAGAIN if the listener's
    # backlog is full (a blocking one would wait there, and the I/O thread with it).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _rx_chain(queue: Queue, payload: int) -> DescriptorChain | None:
    """The next receive buffer, with room for a header and ``payload`` bytes at least."""
    chain = queue.pop()
    if chain is not None and (chain.readable or chain.writable_len < HDR_SIZE + payload):
        raise QueueError("vsock receive buffer is not a writable header and payload")
    return chain


def _limit(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out
