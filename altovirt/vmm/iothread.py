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
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, fd: int, callback: Callable[[], None], events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = callback
        self._ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self._ep.closed:
            self._ep.unregister(fd)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the loop; calling it again does nothing."""
        if self._ep.closed:
            return
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(5)
        self._ep.close()
        os.close(self._wake)

    def _run(self) -> None:
        while not self._stopping:
            for fd, _ in self._ep.poll():
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:
                    log.exception("I/O handler for fd %d failed; it is removed", fd)
                    self.remove(fd)
