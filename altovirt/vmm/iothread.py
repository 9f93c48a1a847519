"""An I/O thread: an epoll loop that runs device work off the vCPU threads.

Devices register file descriptors (ioeventfds for queue notifications, taps,
sockets) with a callback; the thread calls it when the fd is readable. A
callback that raises is logged and unregistered, so one broken device never
stops the others.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class IoThread:
    def __init__(self, name: str = "io") -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._paused = False
        self._parked = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, fd: int, callback: Callable[[], None], events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = callback
        self._ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self._ep.closed:
            self._ep.unregister(fd)

    def in_thread(self) -> bool:
        """Whether the caller is this I/O thread."""
        return threading.current_thread() is self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the loop; calling it again does nothing."""
        if self._ep.closed:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(5)
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

    def _run(self) -> None:
        while not self._stopping:
            if self._paused:
                self._park()
            for fd, _ in self._ep.poll():
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
