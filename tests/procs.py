"""Waiting on processes a test did not start itself (a warm parent's or a fork's VMM)."""

from __future__ import annotations

import time
from pathlib import Path


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has: it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pid: int, timeout: float = 20, poll: float = 0.02) -> None:
    """Until process ``pid`` has ended; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(poll)
