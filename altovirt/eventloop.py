"""The event loop every part of the VMM runs its work on.

An epoll loop: parts register file descriptors (ioeventfds for queue
notifications, taps, sockets, the host console, the stop eventfd) with a
callback, which the loop calls when the fd is readable, and schedule callbacks
with :meth:`EventLoop.call_later`. A callback that raises is logged and
unregistered, so one broken part never stops the others. A loop runs on a
thread of its own (:meth:`EventLoop.start`) or on the caller's
(:meth:`EventLoop.run`, the VMM's main loop); ``on_start`` runs first on that
thread, which is where the VMM confines it (seccomp), without this module
knowing of the sandbox.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0          # s stop() waits for the loop's thread to finish its handler


class EventLoop:
    def __init__(self, name: str = "io", on_start: Callable[[], None] | None = None) -> None:
        """``name`` is the thread's; ``on_start`` runs on the loop's thread before anything else."""
        self._on_start = on_start
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._paused = False
        self._parked = False
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._owner: threading.Thread | None = None     # the thread serving the loop
        self._close_on_exit = False     # stop() gave up waiting: the thread closes as it leaves
        self._left = False              # run() has returned from its last handler

    def add(self, fd: int, callback: Callable[[], None], events: int = select.EPOLLIN) -> None:
        """Call ``callback`` on this loop when ``fd`` has ``events``; OSError (e.g. EPERM for
        a regular file) if epoll cannot watch it."""
        self._ep.register(fd, events)
        self._handlers[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self._ep.closed:
            self._ep.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` once on this thread after ``delay`` seconds (any thread may ask)."""
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))
        os.eventfd_write(self._wake, 1)

    def _run_timers(self) -> float:
        """Run the callbacks that are due; seconds until the next one (-1: none)."""
        while True:
            with self._cond:
                if not self._timers:
                    return -1
                due, _, callback = self._timers[0]
                wait = due - time.monotonic()
                if wait > 0:
                    return wait
                heapq.heappop(self._timers)
            try:
                callback()
            except Exception:
                log.exception("I/O timer callback failed")

    def in_thread(self) -> bool:
        """Whether the caller is the thread serving this loop."""
        return threading.current_thread() is self._owner

    def start(self) -> None:
        """Serve on a thread of the loop's own."""
        self._thread.start()

    def stop_soon(self) -> None:
        """Make :meth:`run` return after the handler running now (any thread, handlers too)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """Stop serving and close the loop; calling it again does nothing. A loop whose thread
        is still in a handler after STOP_TIMEOUT is closed by that thread when it returns: its
        descriptors stay open while it may use them (a number closed under it could be reused
        by the next file opened)."""
        if self._ep.closed or self._close_on_exit:
            return
        self.stop_soon()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
        with self._cond:
            if self._thread.is_alive() and not self._left:
                log.error("the %s loop is still in a handler after %g s; it closes once that "
                          "returns", self._thread.name, STOP_TIMEOUT)
                self._close_on_exit = True
                return
        self._close()

    def _close(self) -> None:
        self._ep.close()
        os.close(self._wake)

    def pause(self) -> None:
        """Return once the loop runs no handler until resume(); no-op if not running."""
        with self._cond:
            self._paused = True
            if not self._thread.is_alive() or threading.current_thread() is self._thread:
                return
            os.eventfd_write(self._wake, 1)
            self._cond.wait_for(lambda: self._parked or not self._thread.is_alive())

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def _park(self) -> None:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._paused or self._stopping)
            self._parked = False

    def run(self) -> None:
        """Serve on the calling thread until :meth:`stop_soon` (or :meth:`stop` from another)."""
        self._owner = threading.current_thread()
        if self._on_start is not None:
            self._on_start()
        while not self._stopping:
            if self._paused:
                self._park()
            for fd, _ in self._ep.poll(self._run_timers()):
                if fd == self._wake:
                    os.eventfd_read(self._wake)
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:
                    log.exception("I/O handler for fd %d failed; it is removed", fd)
                    self.remove(fd)
        with self._cond:
            self._left = True
            if self._close_on_exit:
                self._close()
