"""A VM coming in (the migration thread): from a snapshot's files, or from a live migration's
stream (:mod:`.precopy`), into a VM that waits in inmigrate; the state is then handed to the
main thread as a :class:`~.actions.LoadState` action.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from ..config.model import IncomingConfig
from ..snapshot import format as snapfile
from . import precopy, sections, snapshot
from .actions import LoadState
from .precopy import MigrationError
from .progress import Progress

if TYPE_CHECKING:
    from .machine import Machine


def load_file(m: Machine, incoming: IncomingConfig, where: snapfile.SnapshotFiles,
              progress: Progress) -> None:
    """Load ``m`` from the snapshot at ``where``: its memory mapped copy-on-write, or read in."""
    header, saved = snapfile.read_state(where)
    state = sections.parse(header, saved)           # here, not on the main thread
    snapshot.load_memory(m.mem, where, header, mapped=incoming.map_memory)
    progress.stats.transferred = m.mem.size
    m.request(LoadState(state, incoming.resume, True))


def receive(m: Machine, incoming: IncomingConfig, listener: socket.socket, progress: Progress) -> None:
    """Take the first source that connects to ``listener`` and load ``m`` from its stream."""
    sections.prepare()                  # now, not while the guest waits for its state
    sock, _ = listener.accept()
    sock.settimeout(precopy.IO_TIMEOUT)

    def load(data: bytes) -> None:
        state = sections.parse(*snapfile.decode_state(data, "the migration stream"))
        m.request(LoadState(state, incoming.resume, False))

    try:
        progress.set("active")
        m.mem.discard()                 # the kernel the build loaded: the source's pages replace it
        precopy.receive(sock, m.mem.ram, progress.received, load)
    except (TimeoutError, ConnectionError) as e:
        raise MigrationError(f"the connection was lost ({e.strerror or e})") from e
    finally:
        sock.close()
