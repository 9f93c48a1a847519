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

The stream, once the source has connected::

    hello   "AVMIGR\\r\\n"  version (u32)  RAM size (u64)
    records "P" offset (u64) pages (u32) and the pages: RAM at that offset
            "Z" offset (u64) pages (u32): pages that are zero now
            "S" length (u64) and the state (format.encode_state): the last record
    answer  "K": the destination runs the VM; or "F" length (u32) and why not

One thread of its own, made at start-up (before the sandbox is on), does the work;
the QMP thread only starts, queries and cancels.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import logging
import os
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.model import IncomingConfig, MigrationUri
from ..errors import AltoVirtError
from ..kvm import ioctls as K
from ..memory import PAGE_SHIFT, PAGE_SIZE
from ..persist import SaveError
from ..sandbox import seccomp
from ..snapshot import format as snapfile
from .lifecycle import RunState, StateError
from .vcpu import HOST_ERROR

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

MAGIC = b"AVMIGR\r\n"
STREAM_VERSION = 1
_HELLO = struct.Struct("<8sIQ")
_PAGES = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_REASON = struct.Struct("<I")
MAX_STATE = 64 << 20                # a state record longer than this is not ours
MAX_RUN = 256                       # pages a "P" record carries at most (1 MiB)
MAX_PASSES = 30                     # pre-copy passes before the guest is stopped regardless
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0                   # a peer silent this long has gone
PROGRESS_AFTER = 1.0                # seconds before a long save reports on stderr, once a second
_ZERO_RUN = bytes(MAX_RUN * PAGE_SIZE)
# A byte of a dirty bitmap, as the 8 page flags (0 or 1) it stands for.
_BITS = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]
ACTIVE = ("setup", "active", "device")


class MigrationError(AltoVirtError):
    """A migration that cannot start or did not complete; the message says why."""


class _Cancelled(MigrationError):
    pass


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


def _reader(sock: socket.socket) -> Callable[[int], bytes]:
    """A reader of exactly ``n`` bytes from ``sock`` (EOF is an error)."""
    def read(n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = sock.recv_into(view[got:])
            if not k:
                raise MigrationError("the connection was closed")
            got += k
        return bytes(buf)
    return read


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        k = sock.recv_into(view)
        if not k:
            raise MigrationError("the connection was closed")
        view = view[k:]


def _socket(uri: MigrationUri) -> tuple[socket.socket, str | tuple[str, int]]:
    """A socket for ``uri`` and its address. No name lookup (getaddrinfo): the host is an
    IP address (config/validate.py), and the resolver's modules cannot load in the sandbox."""
    if uri.kind == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC), uri.path
    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC), (uri.host, uri.port)


def connect(uri: MigrationUri) -> socket.socket:
    sock, address = _socket(uri)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address)
    except OSError as e:
        sock.close()
        raise MigrationError(f"{uri}: cannot connect: {e.strerror or e}") from e
    sock.settimeout(IO_TIMEOUT)
    return sock


def listen(uri: MigrationUri) -> socket.socket:
    """The destination's listening socket, made at start-up (a usage error if it cannot be)."""
    sock, address = _socket(uri)
    try:
        if uri.kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise MigrationError(f"-incoming {uri}: cannot listen: {e.strerror or e}") from e
    return sock


class Migration:
    """The VM's one migration (in or out) at a time, and its progress for query-migrate."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine
        self.params = Parameters()
        self.status = "none"
        self.error: str | None = None           # why the last one failed
        self.incoming_error: str | None = None  # why this VM could not be loaded (the VMM stops)
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="migration", daemon=True)
        self._incoming_started = False
        self._listener: socket.socket | None = None
        self._progress_at = 0.0

    def start(self) -> None:
        """Start the migration thread (which confines itself, once seccomp.enable was called)."""
        self._thread.start()

    def close(self) -> None:
        """Stop listening for a source (and remove the unix socket's path)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        path = listener.getsockname() if listener.family == socket.AF_UNIX else ""
        listener.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _serve(self) -> None:
        seccomp.confine("migration")
        while True:
            self._jobs.get()()

    # --- what QMP asks (the QMP thread) ---
    def migrate(self, uri: MigrationUri) -> None:
        """Start sending the VM to ``uri``; StateError or MigrationError if it cannot start."""
        m = self._m
        with self._lock:
            if self.status in ACTIVE:
                raise MigrationError("a migration is already in progress")
            if uri.kind == "file":
                m.lifecycle.require(RunState.PAUSED)
            else:
                m.lifecycle.require(RunState.RUNNING, RunState.PAUSED)
            m.lifecycle.migrating = "snapshot" if uri.kind == "file" else "live"
            self._begin()
        self._jobs.put(lambda: self._outgoing(uri))

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
                listener = listen(incoming.uri)
            except MigrationError:
                with self._lock:
                    self._incoming_started = False
                    self.status = "none"
                raise
        self._listener = listener
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

    def _sent(self, nbytes: int, pages: int = 0, zero: int = 0) -> None:
        s = self._stats
        s.transferred += nbytes
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
    def _outgoing(self, uri: MigrationUri) -> None:
        m = self._m
        try:
            if uri.kind == "file":
                self._save_file(uri.path)
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
            m.lifecycle.migrating = ""

    def _save_file(self, directory: str) -> None:
        m = self._m
        assert m.mem is not None
        header, sections = m.save_state()
        self._set_status("active")
        s = self._stats

        def progress(done: int) -> None:
            s.remaining = s.total - done
            self._sent(done - s.transferred)
        snapshot_id = snapfile.write(directory, header, sections, m.mem.ram, progress)
        s.remaining, s.passes = 0, 1
        self._sent(s.total - s.transferred)
        log.info("snapshot %s written to %s", snapshot_id, directory)

    def _send_live(self, uri: MigrationUri) -> None:
        m = self._m
        assert m.mem is not None and m.vm is not None
        mem, s = m.mem, self._stats
        sock = connect(uri)
        logging_on = False
        was: RunState | None = None
        try:
            sock.sendall(_HELLO.pack(MAGIC, STREAM_VERSION, mem.size))
            self._dirty_logging(True)
            logging_on = True
            self._set_status("active")
            self._send_all(sock)
            s.passes = 1
            while True:
                started = time.monotonic()
                dirty = self._collect_dirty()
                pages = dirty.count(1)
                s.remaining = pages * PAGE_SIZE
                bandwidth = s.transferred / max(time.monotonic() - s.start, 1e-3)
                if self.params.max_bandwidth:
                    bandwidth = min(bandwidth, self.params.max_bandwidth)
                if s.remaining <= bandwidth * self.params.downtime_limit / 1000 or s.passes >= MAX_PASSES:
                    break
                self._send_pages(sock, dirty, capped=True)
                s.passes += 1
                s.dirty_rate = int(pages / max(time.monotonic() - started, 1e-3))
                m.lifecycle.emit("MIGRATION_PASS", {"pass": s.passes})
            was = m.stop_for_migration()
            stopped = time.monotonic()
            assert m.hotplug is not None
            m.hotplug.release_images()          # the destination locks them as it takes over
            self._send_pages(sock, self._collect_dirty(dirty), capped=False)
            with self._lock:
                self.status = "device"
            header, sections = m.save_state()
            state = snapfile.encode_state(header, sections)
            sock.sendall(b"S" + _LENGTH.pack(len(state)) + state)
            s.transferred += len(state)
            s.remaining = 0
            answer = _reader(sock)(1)
            if answer == b"F":
                read = _reader(sock)
                (n,) = _REASON.unpack(read(_REASON.size))
                why = read(min(n, 4096)).decode(errors="replace")
                raise MigrationError(f"the destination refused the VM: {why}")
            if answer != b"K":
                raise MigrationError("the destination answered with garbage")
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
                self._dirty_logging(False)
            sock.close()

    def _dirty_logging(self, on: bool) -> None:
        """Have KVM log the guest's writes to RAM (and the VMM note its own), or stop."""
        m = self._m
        assert m.mem is not None and m.vm is not None
        mem = m.mem
        flags = K.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, region in enumerate(mem.regions):
            m.vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region), flags)
        mem.written = bytearray(mem.size >> PAGE_SHIFT) if on else None

    def _collect_dirty(self, pending: bytearray | None = None) -> bytearray:
        """A flag (0 or 1) per page of RAM: written since the last call, by the guest (KVM's
        log) or the VMM (views taken of RAM, and every active queue's rings), or flagged
        in ``pending`` (collected before, not yet sent)."""
        m = self._m
        assert m.mem is not None and m.vm is not None and m.devices is not None
        mem = m.mem
        for transport in m.devices.transports:
            for q in transport.queues:
                if q.active:
                    for gpa, length in q.ring_ranges():
                        mem.mark_written(gpa, length)
        written, mem.written = mem.written, bytearray(mem.size >> PAGE_SHIFT)
        assert written is not None
        flags = bytearray()
        for slot, region in enumerate(mem.regions):
            pages = region.size >> PAGE_SHIFT
            bitmap = (C.c_uint64 * ((pages + 63) // 64))()
            m.vm.get_dirty_log(slot, bitmap)
            flags += b"".join(_BITS[b] for b in bytes(bitmap))[:pages]
        both = int.from_bytes(flags, "little") | int.from_bytes(written, "little")
        if pending is not None:
            both |= int.from_bytes(pending, "little")
        return bytearray(both.to_bytes(len(written), "little"))

    def _send_all(self, sock: socket.socket) -> None:
        """The first pass: every page that is not zero (the destination's RAM starts zeroed)."""
        assert self._m.mem is not None
        ram, s = self._m.mem.ram, self._stats
        step = MAX_RUN * PAGE_SIZE
        for off in range(0, len(ram), step):
            chunk = ram[off:off + step]
            n = len(chunk) >> PAGE_SHIFT
            if bytes(chunk) == _ZERO_RUN[:len(chunk)]:
                s.remaining -= len(chunk)
                self._sent(0, zero=n)
                continue
            sock.sendall(b"P" + _PAGES.pack(off, n))
            sock.sendall(chunk)
            s.remaining -= len(chunk)
            self._sent(len(chunk) + 1 + _PAGES.size, pages=n)
            self._throttle()

    def _send_pages(self, sock: socket.socket, dirty: bytearray, *, capped: bool) -> None:
        """Every page flagged in ``dirty``, in runs; zero pages as "Z" records."""
        assert self._m.mem is not None
        ram, s = self._m.mem.ram, self._stats
        at = dirty.find(1)
        while at >= 0:
            end = dirty.find(0, at, at + MAX_RUN)
            end = min(at + MAX_RUN, len(dirty)) if end < 0 else end
            n = end - at
            chunk = ram[at << PAGE_SHIFT:end << PAGE_SHIFT]
            if bytes(chunk) == _ZERO_RUN[:len(chunk)]:
                sock.sendall(b"Z" + _PAGES.pack(at << PAGE_SHIFT, n))
                self._sent(1 + _PAGES.size, zero=n)
            else:
                sock.sendall(b"P" + _PAGES.pack(at << PAGE_SHIFT, n))
                sock.sendall(chunk)
                self._sent(len(chunk) + 1 + _PAGES.size, pages=n)
            s.remaining = max(0, s.remaining - len(chunk))
            if capped:
                self._throttle()
            at = dirty.find(1, end)

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
            self._fail_incoming(f"-incoming {incoming.uri}: {reason}")
        except Exception as e:
            log.exception("incoming migration failed")
            self._fail_incoming(f"-incoming {incoming.uri}: internal error: {e}")
        else:
            self._stats.remaining = 0
            self._set_status("completed")
            log.info("VM loaded from %s", incoming.uri)
        finally:
            self.close()

    def _fail_incoming(self, reason: str) -> None:
        log.info("incoming migration failed: %s", reason)     # the VMM's last line says it to the user
        self.incoming_error = reason
        self._set_status("failed", reason)
        self._m.request_stop(HOST_ERROR)      # nothing starts

    def _load_file(self, incoming: IncomingConfig) -> None:
        m = self._m
        assert m.mem is not None and incoming.uri is not None
        directory = incoming.uri.path
        header, sections = snapfile.read_state(directory)
        if header["memory_size"] != m.mem.size:
            raise snapfile.SnapshotError(f"header: {header['memory_size']} bytes of RAM saved; "
                                         f"this VM has {m.mem.size} (-m)")
        if incoming.map_memory:
            fd = snapfile.open_memory(directory)
            try:
                m.mem.map_file(fd)
            finally:
                os.close(fd)
        else:
            m.mem.discard()                 # zero: the file's holes are not read
            snapfile.read_memory(directory, header, m.mem.ram)
        self._stats.transferred = m.mem.size
        m.load_state(header, sections, resume=incoming.resume, new_generation=True)

    def _receive(self, incoming: IncomingConfig) -> None:
        m = self._m
        assert m.mem is not None and self._listener is not None
        sock, _ = self._listener.accept()
        sock.settimeout(IO_TIMEOUT)
        try:
            self._set_status("active")
            read = _reader(sock)
            magic, version, size = _HELLO.unpack(read(_HELLO.size))
            if magic != MAGIC:
                raise MigrationError("the peer is not an AltoVirt migration source")
            if version != STREAM_VERSION:
                raise MigrationError(f"stream version {version}; this AltoVirt reads {STREAM_VERSION}")
            if size != m.mem.size:
                raise MigrationError(f"{size} bytes of RAM sent; this VM has {m.mem.size} (-m)")
            m.mem.discard()                 # the kernel the build loaded: the source's pages replace it
            ram, s = m.mem.ram, self._stats
            while True:
                kind = read(1)
                if kind in (b"P", b"Z"):
                    off, n = _PAGES.unpack(read(_PAGES.size))
                    if off % PAGE_SIZE or not 0 < n <= MAX_RUN or off + n * PAGE_SIZE > len(ram):
                        raise MigrationError(f"a page record out of RAM ({n} pages at {off:#x})")
                    target = ram[off:off + n * PAGE_SIZE]
                    if kind == b"P":
                        _recv_into(sock, target)
                    else:
                        target[:] = _ZERO_RUN[:len(target)]
                    s.transferred += len(target)
                elif kind == b"S":
                    (n,) = _LENGTH.unpack(read(_LENGTH.size))
                    if n > MAX_STATE:
                        raise MigrationError(f"a state record of {n} bytes")
                    header, sections = snapfile.decode_state(read(n), "the migration stream")
                    try:
                        m.load_state(header, sections, resume=incoming.resume, new_generation=False)
                    except (snapfile.SnapshotError, StateError) as e:
                        reason = str(e).encode()
                        sock.sendall(b"F" + _REASON.pack(len(reason)) + reason)
                        raise
                    sock.sendall(b"K")
                    return
                else:
                    raise MigrationError(f"unknown record {kind!r} in the migration stream")
        except (TimeoutError, ConnectionError) as e:
            raise MigrationError(f"the connection was lost ({e.strerror or e})") from e
        finally:
            sock.close()

