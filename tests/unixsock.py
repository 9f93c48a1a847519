"""Small socket helpers shared by tests that talk line protocols (the vsock CONNECT handshake)."""

from __future__ import annotations

import socket


def read_line(s: socket.socket) -> bytes:
    """Bytes up to and including a newline (fewer at EOF), read one at a time so that nothing
    after the line is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        line += c
    return line
