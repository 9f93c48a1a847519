"""Listening unix sockets, with nothing imported that the standard library's socket does
not need: ``altovirt-firecracker`` opens its API socket with this before it imports the VMM."""

from __future__ import annotations

import errno
import os
import socket


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A stream socket listening at ``path``, which appears only once it listens: it is bound
    under a temporary name and linked into place, so a client that sees the path can connect
    (bind then listen would refuse it in between). OSError (EADDRINUSE if ``path`` exists)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if os.path.lexists(path):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        sock.bind(tmp)
        try:
            sock.listen(backlog)
            os.link(tmp, path)          # never replaces an existing file
        except FileExistsError as e:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from e
        finally:
            os.unlink(tmp)
    except OSError:
        sock.close()
        raise
    return sock
