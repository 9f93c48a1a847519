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

The stream and the copying of RAM are :mod:`.precopy`'s.

One thread of its own (the sandbox's ``migration`` role) does the work; the QMP
thread only starts, queries and cancels, and what touches KVM's vCPU state runs on
the main thread (Machine.save_state, load_state, stop_for_migration).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.model import IncomingConfig, MigrationUri
from ..errors import AltoVirtError
from ..memory import PAGE_SIZE
from ..persist import SaveError
from ..sandbox import seccomp
from ..snapshot import format as snapfile
from . import precopy
from .lifecycle import RunState, StateError
from .precopy import MigrationError
from .vcpu import HOST_ERROR

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

MAX_PASSES = 30                     # pre-copy passes before the guest is stopped regardless
PROGRESS_AFTER = 1.0                # seconds before a long save reports on stderr, once a second
ACTIVE = ("setup", "active", "device")


class _Cancelled(MigrationError):
    pass


def snapshot_files(uri: MigrationUri) -> snapfile.SnapshotFiles:
    """The files of a ``file`` URI: its directory's, or its state and memory files."""
    return snapfile.SnapshotFiles(uri.path, uri.memory) if uri.memory else snapfile.files(uri.path)


@dataclass
class Parameters:
    max_bandwidth: int = 128 << 20  # bytes a second (QEMU's default)
    downtime_limit: int = 300       # ms the guest may stay stopped for the last copy


@dataclass
class _Stats:
    start: float = 0.0
    setup_time: float = 0.0
    end: float = 0.0
    downtime: float = 0.0
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    normal: int = 0                 # pages sent with their content
    duplicate: int = 0              # zero pages, skipped or sent as such
    passes: int = 0
    dirty_rate: int = 0             # pages a second, in the last pass


class Migration:
    """The VM's one migration (in or out) at a time, and its progress for query-migrate."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine
        self.params = Parameters()
        self.status = "none"
        self.error: str | None = None           # why the last one failed
        self.incoming_error: str | None = None  # why this VM could not be loaded (the VMM stops)
        # Told when a load has ended: None if it succeeded, else why it failed.
        self.on_incoming_end: Callable[[str | None], None] | None = None
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="migration", daemon=True)
        self._incoming_started = False
        self._listener: socket.socket | None = None
        self._listen_path = ""
        self._progress_at = 0.0

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

    # --- what QMP asks (the QMP thread) ---
    def migrate(self, uri: MigrationUri, on_done: Callable[[], None] | None = None) -> None:
        """Start sending the VM to ``uri``; StateError or MigrationError if it cannot start.
        ``on_done`` is called once it has ended, whichever way."""
        m = self._m
        with self._lock:
            if self.status in ACTIVE:
                raise MigrationError("a migration is already in progress")
            if uri.kind == "file":
                m.lifecycle.begin_migration("snapshot", RunState.PAUSED)
            else:
                m.lifecycle.begin_migration("live", RunState.RUNNING, RunState.PAUSED)
            self._begin()
        self._jobs.put(lambda: self._outgoing(uri, on_done))

    def save_snapshot(self, where: snapfile.SnapshotFiles) -> None:
        """Write a snapshot of the paused VM to ``where`` and return once it is on disk;
        MigrationError (or StateError) saying why it could not be."""
        done = threading.Event()
        self.migrate(MigrationUri("file", path=where.state, memory=where.memory), done.set)
        done.wait()
        if self.status != "completed":
            raise MigrationError(self.error or f"the snapshot was {self.status}")

    def incoming(self, incoming: IncomingConfig, listener: socket.socket | None = None) -> None:
        """Load the VM from ``incoming.uri`` (the VM waits in inmigrate)."""
        assert incoming.uri is not None
        with self._lock:
            self._m.lifecycle.require(RunState.INMIGRATE)
            if self._incoming_started:
                raise MigrationError("an incoming migration has already started")
            self._incoming_started = True
            self._begin()
        if incoming.uri.kind != "file" and listener is None:
            try:
                listener = precopy.listen(incoming.uri)
            except MigrationError:
                with self._lock:
                    self._incoming_started = False
                    self.status = "none"
                raise
        self._listener = listener
        self._listen_path = incoming.uri.path if incoming.uri.kind == "unix" else ""
        self._jobs.put(lambda: self._incoming(incoming))

    def cancel(self) -> None:
        self._cancel.set()

    def set_parameters(self, max_bandwidth: int | None, downtime_limit: int | None) -> None:
        if max_bandwidth is not None:
            self.params.max_bandwidth = max_bandwidth
        if downtime_limit is not None:
            self.params.downtime_limit = downtime_limit

    def info(self) -> dict[str, Any]:
        """query-migrate's answer, as QEMU shapes it ({} before any migration)."""
        with self._lock:
            s, status = self._stats, self.status
            if status == "none":
                return {}
            now = s.end or time.monotonic()
            out: dict[str, Any] = {"status": status, "total-time": int((now - s.start) * 1000)}
            if status == "completed":
                out["downtime"] = int(s.downtime * 1000)
                out["setup-time"] = int(s.setup_time * 1000)
            if status == "failed" and self.error:
                out["error-desc"] = self.error
            elapsed = max(now - s.start, 1e-6)
            out["ram"] = {"transferred": s.transferred, "remaining": s.remaining, "total": s.total,
                          "duplicate": s.duplicate, "normal": s.normal, "normal-bytes": s.normal * PAGE_SIZE,
                          "dirty-pages-rate": s.dirty_rate, "dirty-sync-count": s.passes,
                          "mbps": round(s.transferred * 8 / elapsed / 1e6, 3), "page-size": PAGE_SIZE}
            return out

    # --- status (under or without the lock) ---
    def _begin(self) -> None:
        assert self._m.mem is not None
        self._cancel.clear()
        self.error = None
        self._stats = _Stats(start=time.monotonic(), total=self._m.mem.size, remaining=self._m.mem.size)
        self._progress_at = self._stats.start + PROGRESS_AFTER
        self.status = "setup"
        self._m.lifecycle.emit("MIGRATION", {"status": "setup"})

    def _set_status(self, status: str, error: str | None = None) -> None:
        with self._lock:
            self.status = status
            if status == "active":
                self._stats.setup_time = time.monotonic() - self._stats.start
            if status in ("completed", "failed", "cancelled"):
                self._stats.end = time.monotonic()
                self.error = error
        self._m.lifecycle.emit("MIGRATION", {"status": status})

    def _sent(self, nbytes: int, covered: int, pages: int, zero: int) -> None:
        """Account for what went (precopy.Sent); _Cancelled once migrate_cancel asked."""
        s = self._stats
        s.transferred += nbytes
        s.remaining = max(0, s.remaining - covered)
        s.normal += pages
        s.duplicate += zero
        if self._cancel.is_set():
            raise _Cancelled
        now = time.monotonic()
        if now >= self._progress_at:
            self._progress_at = now + 1.0
            sys.stderr.write(f"altovirt: migration: {s.transferred >> 20} MiB sent, "
                             f"{s.remaining >> 20} MiB of {s.total >> 20} MiB to go (pass {s.passes})\n")
            sys.stderr.flush()

    # --- out (the migration thread) ---
    def _outgoing(self, uri: MigrationUri, on_done: Callable[[], None] | None) -> None:
        m = self._m
        try:
            if uri.kind == "file":
                self._save_file(snapshot_files(uri))
            else:
                self._send_live(uri)
        except _Cancelled:
            log.info("migration to %s cancelled", uri)
            self._set_status("cancelled")
        except (MigrationError, snapfile.SnapshotError, SaveError, StateError, OSError) as e:
            reason = str(e) if isinstance(e, AltoVirtError) else (e.strerror or str(e))
            log.error("migration to %s failed: %s", uri, reason)
            self._set_status("failed", reason)
        except Exception as e:
            log.exception("migration to %s failed", uri)
            self._set_status("failed", f"internal error: {e}")
        else:
            self._set_status("completed")
        finally:
            m.lifecycle.end_migration()
            if on_done is not None:
                on_done()

    def _save_file(self, where: snapfile.SnapshotFiles) -> None:
        m = self._m
        assert m.mem is not None
        header, sections = m.save_state()
        self._set_status("active")
        s = self._stats

        def progress(done: int) -> None:
            self._sent(done - s.transferred, done - s.transferred, 0, 0)
        snapshot_id = snapfile.write(where, header, sections, m.mem.ram, progress,
                                     untouched=m.mem.untouched_pages())
        s.passes = 1
        self._sent(s.total - s.transferred, s.total - s.transferred, 0, 0)
        log.info("snapshot %s written to %s", snapshot_id, where.state)

    def _send_live(self, uri: MigrationUri) -> None:
        m = self._m
        assert m.mem is not None and m.vm is not None and m.devices is not None and m.hotplug is not None
        s, limit = self._stats, self.params
        sock = precopy.connect(uri)
        sender = precopy.Sender(sock, m.mem.ram, self._sent)
        dirty_log = precopy.DirtyLog(m.vm, m.mem, m.devices.transports)
        logging_on = False
        was: RunState | None = None
        try:
            sender.hello()
            dirty_log.start()
            logging_on = True
            self._set_status("active")
            sender.all_pages(self._throttle, m.mem.untouched_pages())
            s.passes = 1
            while True:
                started = time.monotonic()
                dirty = dirty_log.collect()
                pages = dirty.count(1)
                s.remaining = pages * PAGE_SIZE
                bandwidth = s.transferred / max(time.monotonic() - s.start, 1e-3)
                if limit.max_bandwidth:
                    bandwidth = min(bandwidth, limit.max_bandwidth)
                if s.remaining <= bandwidth * limit.downtime_limit / 1000 or s.passes >= MAX_PASSES:
                    break
                sender.pages(dirty, self._throttle)
                s.passes += 1
                s.dirty_rate = int(pages / max(time.monotonic() - started, 1e-3))
                m.lifecycle.emit("MIGRATION_PASS", {"pass": s.passes})
            # The last copy, with the guest stopped: no cap, as the guest waits for it.
            was = m.stop_for_migration()
            stopped = time.monotonic()
            m.hotplug.release_images()          # the destination locks them as it takes over
            sender.pages(dirty_log.collect(dirty), None)
            with self._lock:
                self.status = "device"
            header, sections = m.save_state()
            sender.state(snapfile.encode_state(header, sections))
            s.remaining = 0
            s.downtime = time.monotonic() - stopped
            m.end_migration(True, was)
            was = None
        except (TimeoutError, ConnectionError) as e:
            raise MigrationError(f"{uri}: the connection was lost ({e.strerror or e})") from e
        finally:
            if was is not None:
                with contextlib.suppress(StateError):   # the VMM is stopping anyway
                    m.end_migration(False, was)
            if logging_on:
                dirty_log.stop()
            sock.close()

    def _throttle(self) -> None:
        """Keep to max-bandwidth: sleep off whatever was sent ahead of it."""
        cap = self.params.max_bandwidth
        if cap:
            s = self._stats
            ahead = s.transferred / cap - (time.monotonic() - s.start - s.setup_time)
            if ahead > 0:
                time.sleep(ahead)

    # --- in (the migration thread) ---
    def _incoming(self, incoming: IncomingConfig) -> None:
        assert incoming.uri is not None
        try:
            if incoming.uri.kind == "file":
                self._set_status("active")
                self._load_file(incoming)
            else:
                self._receive(incoming)
        except (MigrationError, snapfile.SnapshotError, StateError, OSError) as e:
            reason = str(e) if isinstance(e, AltoVirtError) else (e.strerror or str(e))
            self._fail_incoming(incoming.uri, reason)
        except Exception as e:
            log.exception("incoming migration failed")
            self._fail_incoming(incoming.uri, f"internal error: {e}")
        else:
            self._stats.remaining = 0
            self._set_status("completed")
            log.info("VM loaded from %s", incoming.uri)
        finally:
            self.close()
            if self.on_incoming_end is not None:
                self.on_incoming_end(self.error if self.status == "failed" else None)

    def _fail_incoming(self, uri: MigrationUri, reason: str) -> None:
        log.info("incoming migration failed: %s", reason)     # the VMM's last line says it to the user
        self.incoming_error = f"-incoming {uri}: {reason}"
        self._set_status("failed", reason)
        self._m.request_stop(HOST_ERROR)      # nothing starts

    def _load_file(self, incoming: IncomingConfig) -> None:
        m = self._m
        assert m.mem is not None and incoming.uri is not None
        where = snapshot_files(incoming.uri)
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
        self._stats.transferred = m.mem.size
        m.load_state(header, sections, resume=incoming.resume, new_generation=True)

    def _receive(self, incoming: IncomingConfig) -> None:
        m = self._m
        assert m.mem is not None and self._listener is not None
        sock, _ = self._listener.accept()
        sock.settimeout(precopy.IO_TIMEOUT)

        def load(data: bytes) -> None:
            header, sections = snapfile.decode_state(data, "the migration stream")
            m.load_state(header, sections, resume=incoming.resume, new_generation=False)

        try:
            self._set_status("active")
            m.mem.discard()                 # the kernel the build loaded: the source's pages replace it
            precopy.receive(sock, m.mem.ram, self._received, load)
        except (TimeoutError, ConnectionError) as e:
            raise MigrationError(f"the connection was lost ({e.strerror or e})") from e
        finally:
            sock.close()

    def _received(self, nbytes: int) -> None:
        self._stats.transferred += nbytes
