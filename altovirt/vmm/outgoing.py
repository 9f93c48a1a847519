"""A VM going out (the migration thread): a snapshot of the paused VM to files, or the running
VM live over the stream (:mod:`.precopy`), pass after pass until :mod:`.convergence` says the
rest fits the downtime limit; the guest then stops for the last copy and its state. What touches
the VM is asked of the main thread as actions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from ..config.model import MigrationUri
from ..memory import PAGE_SIZE
from ..snapshot import format as snapfile
from . import convergence, precopy
from .actions import EndMigration, SaveState, StopForMigration
from .lifecycle import RunState, StateError
from .precopy import MigrationError
from .progress import Progress

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

State = tuple[dict[str, Any], list[snapfile.Section]]      # a saved VM's header and sections


def save_file(m: Machine, where: snapfile.SnapshotFiles, progress: Progress) -> None:
    """Write a snapshot of the paused ``m`` to ``where``."""
    assert m.mem is not None
    header, sections = cast(State, m.request(SaveState()))
    progress.set("active")
    s = progress.stats

    def written(done: int) -> None:
        progress.sent(done - s.transferred, done - s.transferred, 0, 0)
    snapshot_id = snapfile.write(where, header, sections, m.mem.ram, written,
                                 untouched=m.mem.untouched_pages())
    s.passes = 1
    progress.sent(s.total - s.transferred, s.total - s.transferred, 0, 0)
    log.info("snapshot %s written to %s", snapshot_id, where.state)


def send_live(m: Machine, uri: MigrationUri, progress: Progress, params: convergence.Parameters) -> None:
    """Migrate ``m`` live to ``uri``; returns once the destination runs it (``m`` then waits in
    postmigrate), or raises why not, ``m`` running on as it was."""
    assert m.mem is not None and m.vm is not None and m.devices is not None
    s = progress.stats
    throttle = functools.partial(convergence.throttle, s, params)
    sock = precopy.connect(uri)
    sender = precopy.Sender(sock, m.mem.ram, progress.sent)
    dirty_log = precopy.DirtyLog(m.vm, m.mem, m.devices.transports)
    logging_on = False
    was: RunState | None = None
    try:
        sender.hello()
        dirty_log.start()
        logging_on = True
        progress.set("active")
        sender.all_pages(throttle, m.mem.untouched_pages())
        s.passes = 1
        while True:
            started = time.monotonic()
            dirty = dirty_log.collect()
            pages = dirty.count(1)
            s.remaining = pages * PAGE_SIZE
            decided = time.monotonic()
            if convergence.last_pass(s, params, decided - started, m.state_seconds):
                break
            sender.pages(dirty, throttle)
            s.passes += 1
            s.dirty_rate = int(pages / max(time.monotonic() - started, 1e-3))
            m.lifecycle.emit("MIGRATION_PASS", {"pass": s.passes})
        # The last copy, with the guest stopped: no cap, as the guest waits for it.
        was = cast(RunState, m.request(StopForMigration()))
        stopped = time.monotonic()
        with progress.lock:
            progress.status = "device"
        # The state first: saving it may write guest RAM (a GICv3 ITS's tables), which the
        # last pages then carry.
        header, sections = cast(State, m.request(SaveState()))
        saved = time.monotonic()
        last = dirty_log.collect(dirty)
        sender.pages(last, None)
        sent = time.monotonic()
        sender.state(snapfile.encode_state(header, sections))
        s.remaining = 0
        s.downtime = time.monotonic() - stopped
        log.info("live migration: the guest stood still %.0f ms: its state %.0f ms, the last %d pages "
                 "%.0f ms (%d when it was told to stop, %.0f ms before it did), the destination's load "
                 "%.0f ms", 1000 * s.downtime, 1000 * (saved - stopped), last.count(1), 1000 * (sent - saved),
                 pages, 1000 * (stopped - decided), 1000 * (time.monotonic() - sent))
        m.request(EndMigration(True, was))
        was = None
    except (TimeoutError, ConnectionError) as e:
        raise MigrationError(f"{uri}: the connection was lost ({e.strerror or e})") from e
    finally:
        if was is not None:
            with contextlib.suppress(StateError):   # the VMM is stopping anyway
                m.request(EndMigration(False, was))
        if logging_on:
            dirty_log.stop()
        sock.close()
