"""virtio-rng (VIRTIO 1.2, section 5.4): an entropy source fed from getrandom().

An optional limit of ``max_bytes`` per ``period_ms`` (QEMU's max-bytes and
period) paces the guest: when the budget is spent, requests wait on the
queue until the next period starts.
"""

from __future__ import annotations

import os
import time

from ...config.model import RateLimiterConfig
from ...eventloop import EventLoop
from ...memory import GuestMemory
from ..rate_limiter import RateLimiter
from .device import VIRTIO_ID_RNG, Interrupt, VirtioDevice
from .queue import Queue

QUEUE_SIZE = 256


class Rng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, max_bytes: int | None = None, period_ms: int = 1000,
                 rate_limiter: RateLimiterConfig | None = None) -> None:
        """``rate_limiter``: Firecracker's, each request taking an operation and its buffer's
        bytes (besides, or instead of, QEMU's ``max_bytes`` per period)."""
        super().__init__(name)
        self.rate_limiter = RateLimiter(rate_limiter, self._unthrottled)
        self.max_bytes = max_bytes
        self.period = period_ms / 1000
        self._window_start = 0.0
        self._budget = max_bytes or 0
        self._io: EventLoop | None = None
        self._waiting = False           # for the next period, with requests left on the queue

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        self._io = io
        self.rate_limiter.attach(io)

    def _allowance(self, want: int) -> int:
        if self.max_bytes is None:
            return want
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._budget = now, self.max_bytes
        give = min(want, self._budget)
        self._budget -= give
        if not give and not self._waiting and self._io is not None:
            self._waiting = True
            self._io.call_later(self.period - (now - self._window_start), self._next_period)
        return give

    def _next_period(self) -> None:
        self._waiting = False
        self._unthrottled()

    def _unthrottled(self) -> None:
        if self.active is not None and not self.broken:
            self.queue_notify(0)

    def queue_notify(self, index: int) -> None:
        assert self.active is not None
        queue, interrupt = self.active.queues[0], self.active.interrupt
        used = False
        for chain in self.chains(queue):
            if chain.readable or not chain.writable:
                self.fail("request without a device-writable buffer (5.4.6.1)")
                return
            room = chain.writable_len
            give = self._allowance(room)
            if not give:
                queue.undo_pop()
                break
            # The window first: a request it holds back has taken no tokens from the limiter.
            if self.rate_limiter.active and not self.rate_limiter.consume(room):
                self._budget += give            # nor, held back here, bytes from the window
                queue.undo_pop()
                self.counters["entropy_rate_limiter_throttled"] += 1
                break
            data = os.getrandom(give)
            written = 0
            for view in chain.writable:
                part = data[written:written + len(view)]
                view[:len(part)] = part
                written += len(part)
                if written == give:
                    break
            queue.add_used(chain, give)
            self.counters["entropy_event_count"] += 1
            self.counters["entropy_bytes"] += give
            used = True
        if used:
            interrupt.signal_used(queue)

    def reset(self) -> None:
        self._waiting = False
        self.rate_limiter.reset()
        super().reset()
