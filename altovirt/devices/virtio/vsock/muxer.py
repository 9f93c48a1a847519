"""The host side of the vsock device (Firecracker's unix/muxer.rs): the unix socket host
programs connect to, and the sockets guest connections are forwarded to. It owns the
connections, routes the guest's packets to them, watches their sockets, and keeps what waits
for the guest's receive buffers.

What the guest can make us hold is bounded, as in Firecracker's muxer: at most
MAX_CONNECTIONS connections (more are refused with RST), and at most RXQ_SIZE entries
waiting for the guest's receive buffers (see rxq.py).

The device calls in under ``lock``; socket events take it on the I/O thread, and call the
device's ``deliver`` for what they leave for the guest (it hands :meth:`Muxer.fill` the queue).
"""

from __future__ import annotations

import errno
import functools
import logging
import select
import socket
import threading
from collections.abc import Callable

from ....backends.unix import UnixListener
from ....eventloop import EventLoop
from ..queue import Queue, write_at
from .connection import P_FIRST, P_LAST, P_REQUEST, P_RESPONSE, Conn
from .packet import HDR_SIZE, OP_REQUEST, OP_RST, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, header, rx_chain
from .rxq import RxQueue

log = logging.getLogger(__package__)    # (the device's log lines keep the name they had)

FIRST_HOST_PORT = 1 << 30           # host-side ports we hand out for host-initiated connections
CONNECT_LINE_MAX = 64
MAX_CONNECTIONS = 1023              # guest- and host-initiated, with those still saying goodbye
MAX_LOGGED_PORTS = 256              # host ports whose first refused guest connect is logged


class Muxer:
    """One device's connections, keyed (host port, guest port), and its host unix sockets."""

    def __init__(self, name: str, guest_cid: int, listener: UnixListener, io: EventLoop,
                 deliver: Callable[[], None]) -> None:
        self.name = name
        self.guest_cid = guest_cid
        self.listener = listener
        self.uds_path = listener.path
        self.io = io
        self.lock = threading.RLock()
        self._deliver = deliver
        self._conns: dict[tuple[int, int], Conn] = {}
        self._handshakes: dict[int, tuple[socket.socket, bytearray]] = {}
        self._rxq = RxQueue()
        self._full_warned = False
        # Host ports a guest connect to was refused, for the log: the first refusal of each is
        # logged, later ones only at debug level (a guest retrying in a loop floods nothing).
        self._refused_ports: set[int] = set()
        self._next_port = FIRST_HOST_PORT
        self._services: dict[int, Callable[[], socket.socket]] = {}
        io.add(listener.fileno(), self._accept)

    def serve(self, port: int, connect: Callable[[], socket.socket]) -> None:
        """Answer guest connections to host port ``port`` with ``connect()``: a connected,
        non-blocking stream socket (OSError refuses the guest) instead of ``<uds_path>_port``."""
        self._services[port] = connect

    # --- packets to the guest ---
    def fill(self, queue: Queue) -> None:
        """The queue's entries into guest receive buffers, in order, while there are buffers;
        QueueError if one is malformed."""
        rxq, entries = self._rxq, self._rxq.entries
        while entries or not rxq.synced:
            if not entries:
                rxq.resync(self._conns.values())
                if not entries:
                    break
            entry = entries[0]
            if isinstance(entry, Conn):
                if not self._serve(entry, queue):
                    break
            else:
                chain = rx_chain(queue, 0)
                if chain is None:
                    break
                write_at(chain.writable, 0, header(self.guest_cid, entry[0], entry[1], OP_RST))
                queue.add_used(chain, HDR_SIZE)
            rxq.pop()
        if not entries and rxq.dropped:
            log.warning("%s: dropped %d RSTs for the guest", self.name, rxq.dropped)
            rxq.dropped = 0

    def _serve(self, conn: Conn, queue: Queue) -> bool:
        """Give the guest what ``conn`` has for it: control packets, the socket's bytes, then
        its SHUTDOWN or RST, after which it is forgotten. False if the buffers ran out first."""
        if conn.pending & P_FIRST and not conn.send_pending(queue, P_FIRST):
            return False
        if conn.readable:
            owed = conn.stream_to_guest(queue)
            if owed is None:
                return False
            if owed:                        # the host side closed: tell the guest, then forget it
                self._close(conn, owed)
            elif not conn.readable:         # drained: wait for more
                self._watch(conn)
        if conn.pending & P_LAST:
            if not conn.send_pending(queue, P_LAST):
                return False
            self._forget(conn)
        return True

    def _want(self, conn: Conn, bits: int) -> None:
        conn.pending |= bits
        self._rxq.push(conn)

    def _refuse(self, host_port: int, guest_port: int) -> None:
        if not self._rxq.push_rst(host_port, guest_port) and self._rxq.dropped == 1:
            log.warning("%s: %d packets wait for the guest's receive buffers; dropping RSTs",
                        self.name, len(self._rxq.entries))

    # --- host sockets (I/O thread) ---
    def _accept(self) -> None:
        sock = self.listener.accept()
        if sock is None:
            return
        with self.lock:
            if len(self._conns) + len(self._handshakes) >= MAX_CONNECTIONS:
                # (Firecracker's muxer: a host connection beyond MAX_CONNECTIONS is accepted and closed)
                log.warning("%s: %d connections; refusing a host client", self.name, len(self._conns))
                sock.close()
                return
            self._handshakes[sock.fileno()] = (sock, bytearray())
            self.io.add(sock.fileno(), functools.partial(self._handshake, sock))

    def _handshake(self, sock: socket.socket) -> None:
        """Read "CONNECT <port>\\n" from a new host client."""
        with self.lock:
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
            conn = Conn(self._new_port(), int(words[1]), sock, self.guest_cid, self.name,
                        host_initiated=True)
            self._conns[(conn.host_port, conn.guest_port)] = conn
            self._want(conn, P_REQUEST)
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

    def _conn_ready(self, conn: Conn) -> None:
        with self.lock:
            if conn.closed:
                return
            if conn.out and (owed := conn.flush()):
                if owed & P_LAST:
                    self._close(conn, owed)
                    return
                self._want(conn, owed)
            if conn.watching & select.EPOLLIN:  # (or EPOLLOUT only: then a read finds nothing)
                conn.readable = True
                self._rxq.push(conn)
            self._deliver()
            self._watch(conn)   # EPOLLIN off only if bytes are left (no buffer or credit for them)

    def _close(self, conn: Conn, last: int = 0) -> None:
        """Close the host socket. With ``last`` (P_SHUTDOWN or P_RST) the connection stays,
        counted, until that packet reaches the guest (Firecracker's muxer: a connection leaves
        the pool with its RST); without, it is forgotten now."""
        if not conn.closed and conn.watching >= 0:
            self.io.remove(conn.sock.fileno())
        conn.close(last)
        if last:
            self._rxq.push(conn)
        else:
            self._forget(conn)

    def _forget(self, conn: Conn) -> None:
        key = (conn.host_port, conn.guest_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._full_warned = False

    # --- packets from the guest ---
    def packet(self, hdr: tuple[int, ...], payload: list[memoryview]) -> None:
        """One packet from the guest's transmit queue: its unpacked header and payload."""
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = hdr
        if src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST or kind != VIRTIO_VSOCK_TYPE_STREAM:
            log.debug("%s: dropping a packet %d:%d -> %d:%d", self.name, src_cid, src_port, dst_cid, dst_port)
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is None:
            if op == OP_REQUEST:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            elif op != OP_RST:
                self._refuse(dst_port, src_port)
            return
        if conn.closed:                         # its SHUTDOWN or RST is on the way
            if op == OP_RST:
                self._close(conn)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            return
        if op == OP_RST:
            self._close(conn)
            return
        owed = conn.receive(op, flags, length, payload)
        if owed:
            if owed & P_LAST:
                self._close(conn, owed)
                return
            self._want(conn, owed)
        if conn.readable and conn.peer_credit() > 0:    # credit came back for waiting bytes
            self._rxq.push(conn)
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
            first = host_port not in self._refused_ports and len(self._refused_ports) < MAX_LOGGED_PORTS
            if first:
                self._refused_ports.add(host_port)
            log.log(logging.INFO if first else logging.DEBUG,
                    "%s: guest port %d -> host port %d refused (%s)%s", self.name, guest_port, host_port,
                    errno.errorcode.get(e.errno or 0, e),
                    "; later refusals of this port are logged at debug level" if first else "")
            self._refuse(host_port, guest_port)
            return
        conn = Conn(host_port, guest_port, sock, self.guest_cid, self.name, established=True,
                    peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._conns[(host_port, guest_port)] = conn
        self._want(conn, P_RESPONSE)
        self._watch(conn)

    def drop_all(self) -> None:
        """Close every connection (the device is reset, or its state saved)."""
        for conn in list(self._conns.values()):
            self._close(conn)
        self._rxq.clear()

    def close(self) -> None:
        self.drop_all()
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
