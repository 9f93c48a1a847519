"""A function's INTx# pin, for a guest without MSI (PCI 3.0, 2.2.6): a level the function
holds while it has something to say.

The VMM gives the line as two eventfds (:class:`IntxLine`): a write to ``fd`` raises the
pin's GSI, which KVM keeps raised until the guest's EOI, then lowers, signalling
``resample_fd`` (KVM_IRQFD_FLAG_RESAMPLE). The function then raises it again if it still
wants to, so that an interrupt that came in while the guest was handling the last one is
not lost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from ...eventloop import EventLoop


class IntxLine(Protocol):
    """Where a function's INTx# goes: ``fd`` raises it, ``resample_fd`` says it was lowered."""

    fd: int
    resample_fd: int


class Intx:
    """Pin ``line`` of a function, raised whenever ``wanted()`` says so: at :meth:`update`
    and after each EOI (on ``io``)."""

    def __init__(self, line: IntxLine, io: EventLoop, wanted: Callable[[], bool]) -> None:
        self.line = line
        self._io = io
        self._wanted = wanted
        io.add(line.resample_fd, self._resampled)

    def update(self) -> None:
        """Raise the pin if the function wants it raised."""
        if self._wanted():
            os.eventfd_write(self.line.fd, 1)

    def _resampled(self) -> None:
        try:
            os.eventfd_read(self.line.resample_fd)
        except BlockingIOError:
            return
        self.update()

    def close(self) -> None:
        self._io.remove(self.line.resample_fd)
