"""Snapshots and migration: what QMP's ``migrate`` and ``-incoming`` start.

Out of a VM:

- ``file:DIR`` writes a snapshot of the paused VM (:mod:`altovirt.snapshot.format`);
  the VM stays paused, and may go on (``cont``) once it is written.
- ``tcp:HOST:PORT`` and ``unix:PATH`` migrate it live: RAM is copied while the guest
  runs, with KVM's dirty log and the pages the VMM itself wrote into guest RAM (device
  buffers and used rings, which KVM does not see) copied again pass after pass, until
  what is left fits the downtime limit at the bandwidth measured; then the guest stops,
  the rest and the device state go, and the destination answers. If it took the VM the
  source ends paused in ``postmigrate``; otherwise (cancel, a lost connection, a
  refusal) the source goes on as it was.

Into a VM (``-incoming``, or ``migrate-incoming`` after ``-incoming defer``): a VM
built from a matching configuration waits in ``inmigrate`` with its vCPUs stopped,
loads the snapshot (mapping its memory file copy-on-write, or reading it in) or the
stream, and comes up paused, or running if asked.

The parts: the stream and the copying of RAM (:mod:`.precopy`), when to stop
copying (:mod:`.convergence`), the status query-migrate reports (:mod:`.progress`),
what goes out (:mod:`.outgoing`) and what comes in (:mod:`.incoming`). This module
is the worker: one thread of its own (the sandbox's ``migration`` role) runs each
migration; requests reach it as actions on the main thread (start, query, cancel),
and it asks the main thread for what touches the VM (stop, state, load) the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..config.model import IncomingConfig, MigrationUri
from ..errors import AltoVirtError
from ..persist import SaveError
from ..sandbox import seccomp
from ..snapshot import format as snapfile
from . import incoming as incoming_vm
from . import outgoing, precopy
from .convergence import Parameters
from .lifecycle import RunState, StateError
from .precopy import MigrationError
from .progress import ACTIVE, Cancelled, Progress
from .vcpu import HOST_ERROR

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["Migration", "MigrationError", "Parameters", "snapshot_files"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def snapshot_files(uri: MigrationUri) -> snapfile.SnapshotFiles:
    """The files of a ``file`` URI: its directory's, or its state and memory files."""
    return snapfile.SnapshotFiles(uri.path, uri.memory) if uri.memory else snapfile.files(uri.path)


class Migration:
    """The VM's one migration (in or out) at a time, run on the migration thread."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine
        self.params = Parameters()
        self.progress = Progress(lambda status: machine.lifecycle.emit("MIGRATION", {"status": status}))
        self.incoming_error: str | None = None  # why this VM could not be loaded (the VMM stops)
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="migration", daemon=True)
        self._incoming_started = False
        self._listener: socket.socket | None = None
        self._listen_path = ""

    @property
    def status(self) -> str:
        return self.progress.status

    def start(self) -> None:
        """Start the migration thread (which confines itself, once seccomp.enable was called)."""
        self._thread.start()

    def close(self) -> None:
        """Stop listening for a source (and remove the unix socket's path)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        if self._listen_path:
            with contextlib.suppress(OSError):
                os.unlink(self._listen_path)

    def _serve(self) -> None:
        seccomp.confine("migration")
        while True:
            self._jobs.get()()

    # --- requests (the main thread: see actions.py) ---
    def migrate(self, uri: MigrationUri, on_done: Callable[[], None] | None = None) -> None:
        """Start sending the VM to ``uri``; StateError or MigrationError if it cannot start.
        ``on_done`` is called once it has ended, whichever way."""
        m = self._m
        assert m.mem is not None
        with self.progress.lock:
            if self.progress.status in ACTIVE:
                raise MigrationError("a migration is already in progress")
            if uri.kind == "file":
                m.lifecycle.begin_migration("snapshot", RunState.PAUSED)
            else:
                m.lifecycle.begin_migration("live", RunState.RUNNING, RunState.PAUSED)
            self.progress.begin(m.mem.size)
        self._jobs.put(lambda: self._outgoing(uri, on_done))

    def incoming(self, incoming: IncomingConfig, listener: socket.socket | None = None) -> None:
        """Load the VM from ``incoming.uri`` (the VM waits in inmigrate)."""
        assert incoming.uri is not None and self._m.mem is not None
        with self.progress.lock:
            self._m.lifecycle.require(RunState.INMIGRATE)
            if self._incoming_started:
                raise MigrationError("an incoming migration has already started")
            self._incoming_started = True
            self.progress.begin(self._m.mem.size)
        if incoming.uri.kind != "file" and listener is None:
            try:
                listener = self._on_thread(functools.partial(precopy.listen, incoming.uri))
            except MigrationError:
                with self.progress.lock:
                    self._incoming_started = False
                    self.progress.status = "none"
                raise
        self._listener = listener
        self._listen_path = incoming.uri.path if incoming.uri.kind == "unix" else ""
        self._jobs.put(lambda: self._incoming(incoming))

    def _on_thread(self, work: Callable[[], T]) -> T:
        """``work``'s result (or its exception), run on the migration thread: the one whose
        sandbox role may bind and listen (migrate-incoming after -incoming defer)."""
        done = threading.Event()
        outcome: list[Any] = []

        def job() -> None:
            try:
                outcome.append(work())
            except BaseException as e:       # raised again on the asking thread
                outcome.append(e)
            done.set()
        self._jobs.put(job)
        done.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return cast(T, outcome[0])

    def cancel(self) -> None:
        self.progress.cancel()

    def set_parameters(self, max_bandwidth: int | None, downtime_limit: int | None) -> None:
        if max_bandwidth is not None:
            self.params.max_bandwidth = max_bandwidth
        if downtime_limit is not None:
            self.params.downtime_limit = downtime_limit

    def parameters(self) -> dict[str, int]:
        """query-migrate-parameters' answer."""
        return {"max-bandwidth": self.params.max_bandwidth, "downtime-limit": self.params.downtime_limit}

    def info(self) -> dict[str, Any]:
        """query-migrate's answer, as QEMU shapes it ({} before any migration)."""
        return self.progress.info()

    # --- out (the migration thread) ---
    def _outgoing(self, uri: MigrationUri, on_done: Callable[[], None] | None) -> None:
        m = self._m
        try:
            if uri.kind == "file":
                outgoing.save_file(m, snapshot_files(uri), self.progress)
            else:
                outgoing.send_live(m, uri, self.progress, self.params)
        except Cancelled:
            log.info("migration to %s cancelled", uri)
            self.progress.set("cancelled")
        except (MigrationError, snapfile.SnapshotError, SaveError, StateError, OSError) as e:
            reason = str(e) if isinstance(e, AltoVirtError) else (e.strerror or str(e))
            log.error("migration to %s failed: %s", uri, reason)
            self.progress.set("failed", reason)
        except Exception as e:
            log.exception("migration to %s failed", uri)
            self.progress.set("failed", f"internal error: {e}")
        else:
            self.progress.set("completed")
        finally:
            m.lifecycle.end_migration()
            if on_done is not None:
                on_done()

    # --- in (the migration thread) ---
    def _incoming(self, incoming: IncomingConfig) -> None:
        assert incoming.uri is not None
        progress = self.progress
        try:
            if incoming.uri.kind == "file":
                progress.set("active")
                incoming_vm.load_file(self._m, incoming, snapshot_files(incoming.uri), progress)
            else:
                assert self._listener is not None
                incoming_vm.receive(self._m, incoming, self._listener, progress)
        except (MigrationError, snapfile.SnapshotError, StateError, OSError) as e:
            reason = str(e) if isinstance(e, AltoVirtError) else (e.strerror or str(e))
            self._fail_incoming(incoming.uri, reason)
        except Exception as e:
            log.exception("incoming migration failed")
            self._fail_incoming(incoming.uri, f"internal error: {e}")
        else:
            progress.stats.remaining = 0
            progress.set("completed")
            log.info("VM loaded from %s", incoming.uri)
        finally:
            self.close()

    def _fail_incoming(self, uri: MigrationUri, reason: str) -> None:
        log.info("incoming migration failed: %s", reason)     # the VMM's last line says it to the user
        self.incoming_error = f"-incoming {uri}: {reason}"
        self.progress.set("failed", reason)
        self._m.request_stop(HOST_ERROR)      # nothing starts
