"""The XenStore's connections: xenstored's socket protocol for the host (dom0) on a
unix socket, and for the guest on a vsock port.

Point Xen's tools at the host socket with ``XENSTORED_PATH=<socket>
xenstore-read ...``, or ``pyxs.Client(unix_socket_path=...)``. The guest
connects to the host (CID 2) on port :data:`GUEST_VSOCK_PORT` of the VM's
vsock device and is its own domain there, held to its permissions and
quotas. The server runs on its own thread; watch events raised by other
threads (QMP) are queued and the thread is woken to send them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable

from ..backends.unix import PendingOutput, UnixListener
from ..eventloop import EventLoop
from .store import DOM0, Store
from .wire import Connection

log = logging.getLogger(__name__)

# The vsock port (on the host, CID 2) where the guest finds the store: "XS".
GUEST_VSOCK_PORT = 0x5853
MAX_OUTPUT = 4 << 20           # replies and events a client has not read; past this it is dropped


class _Client:
    def __init__(self, server: XenStoreServer, sock: socket.socket, domid: int) -> None:
        self.sock = sock
        self.out = PendingOutput()
        self.conn = Connection(server.store, domid, functools.partial(server.queue, self))


class XenStoreServer:
    def __init__(self, path: str, store: Store, on_start: Callable[[], None] | None = None) -> None:
        """``on_start`` runs first on the server's thread (the VMM confines it there)."""
        self.store = store
        self.listener = UnixListener(path, backlog=64)
        self.io = EventLoop("xenstore", on_start)
        self._clients: dict[int, _Client] = {}
        self._dirty: set[_Client] = set()          # clients with output queued since the last flush
        self._lock = threading.RLock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False
        self.io.add(self.listener.fileno(), self._accept)
        self.io.add(self._wake, self._woken)

    def start(self) -> None:
        self.io.start()

    def queue(self, client: _Client, message: bytes) -> None:
        """Send ``message`` to ``client`` soon (any thread)."""
        with self._lock:
            if client.sock.fileno() < 0:
                return
            if len(client.out.buf) + len(message) > MAX_OUTPUT:
                log.warning("XenStore client is not reading; dropping it")
                self._drop(client)
                return
            client.out.buf += message
            self._dirty.add(client)
        if not self.io.in_thread():
            os.eventfd_write(self._wake, 1)

    def guest_socket(self) -> socket.socket:
        """A new connection for the guest's domain: one end of a socket pair is served
        here, the other (non-blocking) is for the vsock device to carry."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        theirs.setblocking(False)
        with self._lock:
            if self._closed:
                ours.close()
                theirs.close()
                raise ConnectionRefusedError(errno.ECONNREFUSED, "the XenStore is closed")
            self._add(ours, self.store.guest_domid)
        return theirs

    def _accept(self) -> None:
        sock = self.listener.accept()
        if sock is not None:
            self._add(sock, DOM0)

    def _add(self, sock: socket.socket, domid: int) -> None:
        client = _Client(self, sock, domid)
        with self._lock:
            self._clients[sock.fileno()] = client
            self.io.add(sock.fileno(), functools.partial(self._readable, client))

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if self._clients.pop(client.sock.fileno(), None) is None:
                return
            self.io.remove(client.sock.fileno())
            client.sock.close()
            client.conn.close()

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:             # woken for EPOLLOUT: the client reads again
            self._flush(client)
            return
        except OSError:
            data = b""
        if not data or not client.conn.feed(data):
            self._drop(client)              # gone, or a request over the payload limit
        self._flush_all()                   # the replies, and the events for other clients

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        self._flush_all()

    def _flush_all(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for client in dirty:
                self._flush(client)

    def _flush(self, client: _Client) -> None:
        with self._lock:
            if client.sock.fileno() < 0:
                return
            if not client.out.flush(client.sock, self.io):
                self._drop(client)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.io.stop()
        with self._lock:
            for client in list(self._clients.values()):
                client.sock.close()
                client.conn.close()
            self._clients.clear()
        self.listener.close()
        os.close(self._wake)
