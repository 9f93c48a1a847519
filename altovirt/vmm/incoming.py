"""A VM coming in (the migration thread): from a snapshot's files, or from a live migration's
stream (:mod:`.precopy`), into a VM that waits in inmigrate; the state is then handed to the
main thread as a :class:`~.actions.LoadState` action.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from ..config.model import IncomingConfig
from ..snapshot import format as snapfile
from . import precopy
from .actions import LoadState
from .precopy import MigrationError
from .progress import Progress

if TYPE_CHECKING:
    from .machine import Machine


def load_file(m: Machine, incoming: IncomingConfig, where: snapfile.SnapshotFiles,
              progress: Progress) -> None:
    """Load ``m`` from the snapshot at ``where``: its memory mapped copy-on-write, or read in."""
    assert m.mem is not None
    header, sections = snapfile.read_state(where)
    if header["memory_size"] != m.mem.size:
        raise snapfile.SnapshotError(f"header: {header['memory_size']} bytes of RAM saved; "
                                     f"this VM has {m.mem.size} (-m)")
    if incoming.map_memory:
        fd = snapfile.open_memory(where)
        try:
            m.mem.map_file(fd)
        finally:
            os.close(fd)
    else:
        m.mem.discard()                 # zero: the file's holes are not read
        snapfile.read_memory(where, header, m.mem.ram)
    progress.stats.transferred = m.mem.size
    m.request(LoadState(header, sections, incoming.resume, True))


def receive(m: Machine, incoming: IncomingConfig, listener: socket.socket, progress: Progress) -> None:
    """Take the first source that connects to ``listener`` and load ``m`` from its stream."""
    assert m.mem is not None
    sock, _ = listener.accept()
    sock.settimeout(precopy.IO_TIMEOUT)

    def load(data: bytes) -> None:
        header, sections = snapfile.decode_state(data, "the migration stream")
        m.request(LoadState(header, sections, incoming.resume, False))

    try:
        progress.set("active")
        m.mem.discard()                 # the kernel the build loaded: the source's pages replace it
        precopy.receive(sock, m.mem.ram, progress.received, load)
    except (TimeoutError, ConnectionError) as e:
        raise MigrationError(f"the connection was lost ({e.strerror or e})") from e
    finally:
        sock.close()
