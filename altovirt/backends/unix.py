"""Listening unix sockets that devices serve (console, vsock).

The socket file must not exist beforehand (the spec's rule for -chardev
and -api-channel); it is created at start and removed when closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from . import BackendError


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
                                   "before start") from None
            raise BackendError(e.errno, f"{path}: {e.strerror}") from None

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
