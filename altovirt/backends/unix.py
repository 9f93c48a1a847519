"""Unix sockets we serve: listeners (console, vsock, QMP, XenStore) and the output
queued for their clients.

The socket file must not exist beforehand (the spec's rule for -chardev
and -api-channel); it is created at start and removed when closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
from typing import TYPE_CHECKING

from . import BackendError

if TYPE_CHECKING:
    from ..eventloop import EventLoop


class UnixListener:
    def __init__(self, path: str, backlog: int = 8) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self.sock.listen(backlog)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
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
