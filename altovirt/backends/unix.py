"""Unix sockets we serve: listeners (console, vsock, QMP, XenStore), the output
queued for their clients, and the server QMP and the XenStore share.

The socket file must not exist beforehand (the spec's rule for -chardev
and -api-channel); it is created at start and removed when closed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..eventloop import EventLoop
from . import BackendError
from .listen import listen_unix

log = logging.getLogger(__name__)


class UnixListener:
    def __init__(self, path: str, backlog: int = 8, sock: socket.socket | None = None) -> None:
        """Listen at ``path``, or take ``sock``, already listening there (see listen_unix)."""
        self.path = path
        try:
            self.sock = sock if sock is not None else listen_unix(path, backlog)
            self.sock.setblocking(False)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BackendError(e.errno, f"{path} already exists; it must not exist "
                                   "before start") from e
            raise BackendError(e.errno, f"{path}: {e.strerror}") from e

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        return conn

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class PendingOutput:
    """What a server has queued for one client on a non-blocking stream socket that an
    I/O thread polls; while some is left, the thread also waits for room (EPOLLOUT)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._waiting = False

    def flush(self, sock: socket.socket, io: EventLoop) -> bool:
        """Send until the socket would block; False when the peer is gone."""
        while self.buf:
            try:
                sent = sock.send(self.buf)
            except BlockingIOError:
                break
            except OSError:
                return False
            del self.buf[:sent]
        waiting = bool(self.buf)
        if waiting != self._waiting:
            io.modify(sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if waiting else 0))
            self._waiting = waiting
        return True


@dataclass(eq=False)
class Peer:
    """One client of a :class:`SocketServer`: its socket and what is queued for it."""

    sock: socket.socket
    out: PendingOutput = field(default_factory=PendingOutput)


P = TypeVar("P", bound=Peer)


class SocketServer(Generic[P]):
    """A stream-socket server on an event loop of its own.

    It accepts on a :class:`UnixListener`, reads what each client sends and hands
    it to :meth:`received`, and sends what :meth:`send` queued for a client as its
    socket takes it. A client that hangs up, or stops reading while more than
    ``max_output`` bytes wait for it, is dropped; nothing one client does stops
    the others. Subclasses make their peers (:meth:`accepted`) and handle input.
    """

    def __init__(self, path: str, name: str, *, max_output: int, backlog: int = 8,
                 on_start: Callable[[], None] | None = None, sock: socket.socket | None = None) -> None:
        """``on_start`` runs first on the server's thread (the VMM confines it there); ``sock``
        is the listening socket at ``path`` if the caller made it."""
        self.name = name
        self.max_output = max_output
        self.listener = UnixListener(path, backlog, sock)
        self.io = EventLoop(name, on_start)
        self._lock = threading.RLock()
        self._peers: dict[int, P] = {}
        self._dirty: set[P] = set()             # peers with output queued since the last flush
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False
        self.io.add(self.listener.fileno(), self._accept)
        self.io.add(self._wake, self._woken)

    def start(self) -> None:
        self.io.start()

    # --- what subclasses provide (the server's thread) ---
    def accepted(self, sock: socket.socket) -> P:
        """The peer for a connection the listener accepted."""
        raise NotImplementedError

    def read(self, peer: P) -> bytes | None:
        """What the client sent: b"" when it is gone, None when there is nothing yet."""
        try:
            return peer.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def received(self, peer: P, data: bytes) -> bool:
        """Handle input; False drops the client."""
        raise NotImplementedError

    def dropped(self, peer: P) -> None:
        """The client is gone: release what it held."""

    # --- peers ---
    @property
    def peers(self) -> list[P]:
        with self._lock:
            return list(self._peers.values())

    def add(self, peer: P) -> None:
        """Serve ``peer`` (any thread); ConnectionRefusedError once the server is closed."""
        with self._lock:
            if self._closed:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"the {self.name} server is closed")
            self._peers[peer.sock.fileno()] = peer
            self.io.add(peer.sock.fileno(), lambda: self._readable(peer))
        self._schedule_flush(peer)

    def send(self, peer: P, data: bytes) -> None:
        """Queue ``data`` for ``peer`` (any thread); it leaves as the socket takes it."""
        with self._lock:
            if peer.sock.fileno() < 0:
                return
            if len(peer.out.buf) + len(data) > self.max_output:
                log.warning("%s: a client is not reading what it is sent; it is dropped", self.name)
                self.drop(peer, "not reading")
                return
            peer.out.buf += data
        self._schedule_flush(peer)

    def drop(self, peer: P, why: str) -> None:
        """Stop serving ``peer`` (any thread). What it held is released (:meth:`dropped`)
        afterwards on the server's thread, outside this server's lock: releasing takes the
        locks of what the peer used (the XenStore's), which a thread sending to peers may
        hold already (a watch event sent under the store's lock; the other order deadlocked)."""
        with self._lock:
            if self._peers.pop(peer.sock.fileno(), None) is None:
                return
            self._dirty.discard(peer)
            self.io.remove(peer.sock.fileno())
            peer.sock.close()
            closing = self._closed          # the loop may be gone: release it here
        if closing:
            self.dropped(peer)
        else:
            self.io.call_later(0, functools.partial(self.dropped, peer))
        log.debug("%s: client dropped: %s", self.name, why)

    def flush(self, peer: P) -> None:
        """Send what the socket takes now (the server's thread)."""
        with self._lock:
            if peer.sock.fileno() >= 0 and not peer.out.flush(peer.sock, self.io):
                self.drop(peer, "write failed")

    # --- the server's thread ---
    def _schedule_flush(self, peer: P) -> None:
        with self._lock:
            self._dirty.add(peer)
        if not self.io.in_thread():
            os.eventfd_write(self._wake, 1)

    def _flush_dirty(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for peer in dirty:
                self.flush(peer)

    def _accept(self) -> None:
        sock = self.listener.accept()
        if sock is not None:
            self.add(self.accepted(sock))
            self._flush_dirty()

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        self._flush_dirty()

    def _readable(self, peer: P) -> None:
        data = self.read(peer)
        if data is None:                    # woken for EPOLLOUT: the client reads again
            self.flush(peer)
            return
        if not data or not self.received(peer, data):
            self.drop(peer, "disconnected" if not data else "refused")
        self._flush_dirty()                 # the replies, and whatever other clients were sent

    def close(self, flush_timeout: float = 0.0) -> None:
        """Stop serving; each client has up to ``flush_timeout`` to take what is queued."""
        with self._lock:
            self._closed = True
        self.io.stop()
        deadline = time.monotonic() + flush_timeout
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
            for peer in peers:
                if flush_timeout and peer.out.buf:
                    peer.sock.setblocking(True)
                    peer.sock.settimeout(max(0.01, deadline - time.monotonic()))
                    with contextlib.suppress(OSError):
                        peer.sock.sendall(peer.out.buf)
                peer.sock.close()
        for peer in peers:                  # outside the lock, as in drop()
            self.dropped(peer)
        self.listener.close()
        os.close(self._wake)
