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

import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..backends.unix import Peer, SocketServer
from .store import DOM0, Store
from .wire import Connection

# The vsock port (on the host, CID 2) where the guest finds the store: "XS".
GUEST_VSOCK_PORT = 0x5853
MAX_OUTPUT = 4 << 20           # replies and events a client has not read; past this it is dropped


@dataclass(eq=False)
class _Client(Peer):
    conn: Connection | None = None


class XenStoreServer(SocketServer[_Client]):
    def __init__(self, path: str, store: Store, on_start: Callable[[], None] | None = None) -> None:
        """``on_start`` runs first on the server's thread (the VMM confines it there)."""
        super().__init__(path, "xenstore", max_output=MAX_OUTPUT, backlog=64, on_start=on_start)
        self.store = store

    def guest_socket(self) -> socket.socket:
        """A new connection for the guest's domain: one end of a socket pair is served
        here, the other (non-blocking) is for the vsock device to carry."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        theirs.setblocking(False)
        try:
            self.add(self._client(ours, self.store.guest_domid))
        except ConnectionRefusedError:
            ours.close()
            theirs.close()
            raise
        return theirs

    def _client(self, sock: socket.socket, domid: int) -> _Client:
        client = _Client(sock)
        client.conn = Connection(self.store, domid, lambda message: self.send(client, message))
        return client

    def accepted(self, sock: socket.socket) -> _Client:
        return self._client(sock, DOM0)

    def received(self, client: _Client, data: bytes) -> bool:
        assert client.conn is not None
        return client.conn.feed(data)       # False: a request over the payload limit

    def dropped(self, client: _Client) -> None:
        assert client.conn is not None
        client.conn.close()
