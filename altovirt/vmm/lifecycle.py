"""The VM's run state, the moves between states, and who hears of them.

States and their names are QMP's RunState: prelaunch -> running <-> paused,
and from any of them -> shutdown, which is final. A VM restored from a snapshot
or a migration starts in inmigrate and goes to paused (or running) once its
state is in; a live migration's source goes through finish-migrate (the last
copy, vCPUs stopped) to postmigrate, or back to running if it failed. A stop
can be asked for from any thread (the guest, a signal, QMP); the first reason
given wins and is announced, and the main loop is woken through an eventfd to
act on it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
from collections.abc import Callable, Iterator

from ..errors import AltoVirtError
from ..eventloop import EventLoop
from .vcpu import StopReason

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"


MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.PRELAUNCH: frozenset({RunState.RUNNING, RunState.INMIGRATE, RunState.SHUTDOWN}),
    RunState.INMIGRATE: frozenset({RunState.PAUSED, RunState.SHUTDOWN}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.FINISH_MIGRATE, RunState.SHUTDOWN}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.FINISH_MIGRATE, RunState.SHUTDOWN}),
    RunState.FINISH_MIGRATE: frozenset({RunState.POSTMIGRATE, RunState.RUNNING, RunState.PAUSED,
                                        RunState.SHUTDOWN}),
    RunState.POSTMIGRATE: frozenset({RunState.RUNNING, RunState.SHUTDOWN}),
    RunState.SHUTDOWN: frozenset(),
}

Listener = Callable[[str, dict[str, object]], None]


class StateError(AltoVirtError, RuntimeError):
    """A lifecycle request that makes no sense in the VM's current state."""


class Lifecycle:
    """Holds the run state. ``lock`` serializes whatever changes the machine's state
    (pause, resume, reset, hot-plug); moves are made under it."""

    def __init__(self) -> None:
        self.state = RunState.PRELAUNCH
        self.lock = threading.Lock()
        self.stop_reason: StopReason | None = None
        # "snapshot" or "live" while one is taken: no hot-plug meanwhile, and a snapshot's
        # VM stays paused until it is written. Changed under ``lock`` only.
        self.migrating = ""
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_lock = threading.Lock()
        self._listeners: list[Listener] = []

    def require(self, *states: RunState) -> None:
        """StateError unless the VM is in one of ``states``: "the VM is paused, not running",
        or "the VM is shutdown" when several states would do."""
        if self.state not in states:
            wanted = f", not {states[0]}" if len(states) == 1 else ""
            raise StateError(f"the VM is {self.state}{wanted}")

    def move(self, to: RunState) -> None:
        """Go to ``to``; the caller holds ``lock`` and has checked the move is wanted."""
        if to not in MOVES[self.state]:
            raise StateError(f"the VM cannot go from {self.state} to {to}")
        self.state = to

    def begin_migration(self, kind: str, *states: RunState) -> None:
        """Mark a migration of ``kind`` ("snapshot" or "live") as running, if the VM is in one
        of ``states`` and none runs; StateError otherwise. The check and the mark are one step
        under ``lock``, so no pause, resume, reset or hot-plug comes in between."""
        with self.lock:
            self.require(*states)
            if self.migrating:
                raise StateError("a migration is already in progress")
            self.migrating = kind

    def end_migration(self) -> None:
        with self.lock:
            self.migrating = ""

    def request_stop(self, reason: StopReason) -> None:
        """Ask the main loop to stop the VM (any thread); the first reason wins and is announced."""
        with self._stop_lock:
            first = self.stop_reason is None
            if first:
                self.stop_reason = reason
                self.state = RunState.SHUTDOWN      # from any state, without waiting for the lock
                log.info("stopping: %s", reason.reason)
        if first:
            self.emit("SHUTDOWN", {"guest": reason.guest, "reason": reason.reason})
        os.eventfd_write(self.stop_fd, 1)

    def add_listener(self, listener: Listener) -> None:
        """``listener(event, data)`` hears STOP, RESUME, SHUTDOWN, RESET, POWERDOWN and
        DEVICE_DELETED (QMP's events)."""
        self._listeners.append(listener)

    def emit(self, event: str, data: dict[str, object]) -> None:
        for listener in self._listeners:
            listener(event, data)

    def close(self) -> None:
        if self.stop_fd >= 0:
            os.close(self.stop_fd)
            self.stop_fd = -1


@contextlib.contextmanager
def devices_still(life: Lifecycle, io: EventLoop) -> Iterator[None]:
    """Hold device work still (a hot-plug slot is changing), whether the guest runs or not:
    StateError while the VM stops, waits for its state or migrates."""
    with life.lock:
        if life.state == RunState.SHUTDOWN:
            raise StateError("the VM is shutting down")
        if life.state == RunState.INMIGRATE:
            raise StateError("the VM waits for its state (inmigrate), which brings its devices")
        if life.migrating:
            raise StateError("a migration is in progress")
        running = life.state == RunState.RUNNING
        if running:
            io.pause()
        try:
            yield
        finally:
            if running:
                io.resume()


def device_deleted(life: Lifecycle, name: str) -> None:
    """Announce an unplugged device (QMP's DEVICE_DELETED)."""
    life.emit("DEVICE_DELETED", {"device": name, "path": name})
