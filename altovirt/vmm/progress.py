"""A migration's status and accounting, as query-migrate and the MIGRATION events report
them (QEMU's shapes). The migration thread writes it; any thread may read :meth:`Progress.info`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..memory import PAGE_SIZE
from .precopy import MigrationError

ACTIVE = ("setup", "active", "device")
ENDED = ("completed", "failed", "cancelled")
PROGRESS_AFTER = 1.0                # seconds before a long migration reports on stderr, once a second


class Cancelled(MigrationError):
    """migrate_cancel asked; raised where the sender accounts for what it sent."""


@dataclass
class Stats:
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


class Progress:
    """The status of the VM's one migration at a time; ``emit(status)`` announces each change."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.status = "none"
        self.error: str | None = None           # why the last one failed
        self.stats = Stats()
        self.lock = threading.Lock()
        self._emit = emit
        self._cancel = threading.Event()
        self._report_at = 0.0

    def begin(self, total: int) -> None:
        """A new migration of ``total`` bytes of RAM; the caller holds :attr:`lock`."""
        self._cancel.clear()
        self.error = None
        self.stats = Stats(start=time.monotonic(), total=total, remaining=total)
        self._report_at = self.stats.start + PROGRESS_AFTER
        self.status = "setup"
        self._emit("setup")

    def set(self, status: str, error: str | None = None) -> None:
        with self.lock:
            self.status = status
            if status == "active":
                self.stats.setup_time = time.monotonic() - self.stats.start
            if status in ENDED:
                self.stats.end = time.monotonic()
                self.error = error
        self._emit(status)

    def cancel(self) -> None:
        self._cancel.set()

    def sent(self, nbytes: int, covered: int, pages: int, zero: int) -> None:
        """Account for what went (precopy.Sent); Cancelled once migrate_cancel asked."""
        s = self.stats
        s.transferred += nbytes
        s.remaining = max(0, s.remaining - covered)
        s.normal += pages
        s.duplicate += zero
        if self._cancel.is_set():
            raise Cancelled
        now = time.monotonic()
        if now >= self._report_at:
            self._report_at = now + 1.0
            sys.stderr.write(f"altovirt: migration: {s.transferred >> 20} MiB sent, "
                             f"{s.remaining >> 20} MiB of {s.total >> 20} MiB to go (pass {s.passes})\n")
            sys.stderr.flush()

    def received(self, nbytes: int) -> None:
        self.stats.transferred += nbytes

    def info(self) -> dict[str, Any]:
        """query-migrate's answer, as QEMU shapes it ({} before any migration)."""
        with self.lock:
            s, status = self.stats, self.status
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
