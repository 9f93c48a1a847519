"""Firecracker's I/O rate limiter (``src/vmm/src/rate_limiter/mod.rs``): two token buckets,
one of bytes and one of operations, that a device takes from before it does the work.

A bucket holds ``size`` tokens and refills from empty to full in ``refill_time`` ms,
continuously; ``one_time_burst`` tokens more are spent first and never come back. A take
larger than the whole bucket is allowed once the bucket has anything: it empties the bucket
and the limiter stays blocked for the time the excess takes to refill. When a take fails the
limiter blocks for ``REFILL_TIMER`` and then calls the device back on its I/O thread, so a
throttled queue resumes on the limiter's timer, not on the guest's next notification (which
finds the limiter blocked and does nothing, as in Firecracker).

Everything here runs on the device's I/O thread, the timer included.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config.model import RateLimiterConfig, TokenBucketConfig
from ..eventloop import EventLoop

REFILL_TIMER = 0.1          # s a failed take blocks for (Firecracker's REFILL_TIMER_DURATION)
NS_PER_MS = 1_000_000


class TokenBucket:
    """One bucket; ``clock`` gives nanoseconds (time.monotonic_ns, or a test's)."""

    def __init__(self, cfg: TokenBucketConfig, clock: Callable[[], int] = time.monotonic_ns) -> None:
        assert cfg.size > 0 and cfg.refill_time > 0
        self.cfg = cfg
        self.size = cfg.size
        self.refill_ns = cfg.refill_time * NS_PER_MS
        self.one_time_burst = cfg.one_time_burst
        self.budget = cfg.size
        self._clock = clock
        self._last = clock()

    def _replenish(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed >= self.refill_ns:
            self.budget, self._last = self.size, now
            return
        tokens = elapsed * self.size // self.refill_ns
        # Move the mark on by the time those whole tokens took (rounded up), not to now: the
        # fraction of a token earned since is kept for the next look.
        self._last += -(-tokens * self.refill_ns // self.size)
        self.budget = min(self.budget + tokens, self.size)

    def reduce(self, tokens: int) -> float | None:
        """Take ``tokens``. None if the bucket has too few (nothing is taken); otherwise the
        seconds the limiter must stay blocked for: 0.0, or for a take larger than the whole
        bucket, the time the excess takes to refill (Firecracker's OverConsumption)."""
        if self.one_time_burst:
            if self.one_time_burst >= tokens:
                self.one_time_burst -= tokens
                self._last = self._clock()
                return 0.0
            tokens -= self.one_time_burst
            self.one_time_burst = 0
        if tokens > self.budget:
            self._replenish()
            if tokens > self.size:
                excess = tokens - self.budget
                self.budget = 0
                return excess * self.refill_ns / self.size / 1e9
            if tokens > self.budget:
                return None
        self.budget -= tokens
        return 0.0

    def give_back(self, tokens: int) -> None:
        """Undo a take (of an operation whose bytes could not be taken)."""
        if self.one_time_burst:
            self.one_time_burst = min(self.one_time_burst + tokens, self.cfg.one_time_burst)
        else:
            self.budget = min(self.budget + tokens, self.size)


class RateLimiter:
    """A device's limiter. ``on_unblocked`` runs on the I/O thread when a block ends: the
    device looks at its queue again. :meth:`attach` gives it the loop (at activation)."""

    def __init__(self, cfg: RateLimiterConfig | None, on_unblocked: Callable[[], None],
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self.cfg = RateLimiterConfig()
        self.bandwidth: TokenBucket | None = None
        self.ops: TokenBucket | None = None
        self.blocked = False
        self._on_unblocked = on_unblocked
        self._io: EventLoop | None = None
        self._timer = 0                     # the current block's number: older timers do nothing
        self.update(cfg or RateLimiterConfig())

    @property
    def active(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    def attach(self, io: EventLoop) -> None:
        self._io = io

    def update(self, cfg: RateLimiterConfig) -> None:
        """New settings: a bucket whose settings changed starts anew and full, one that did
        not keeps its tokens (PATCH's rule); a block in progress runs its course."""
        if cfg.bandwidth != self.cfg.bandwidth:
            self.bandwidth = TokenBucket(cfg.bandwidth, self._clock) if cfg.bandwidth else None
        if cfg.ops != self.cfg.ops:
            self.ops = TokenBucket(cfg.ops, self._clock) if cfg.ops else None
        self.cfg = cfg

    def consume(self, nbytes: int, ops: int = 1) -> bool:
        """Take ``ops`` operations and ``nbytes`` bytes, both or neither; False (and blocked
        until the timer) if the buckets cannot give them now."""
        if self.blocked:
            return False
        wait = 0.0
        if self.ops is not None:
            took = self.ops.reduce(ops)
            if took is None:
                return self._refuse(REFILL_TIMER)
            wait = took
        if self.bandwidth is not None and nbytes:
            took = self.bandwidth.reduce(nbytes)
            if took is None:
                if self.ops is not None:
                    self.ops.give_back(ops)
                return self._refuse(REFILL_TIMER)
            wait = max(wait, took)
        if wait:
            self._block(wait)
        return True

    def _refuse(self, delay: float) -> bool:
        self._block(delay)
        return False

    def _block(self, delay: float) -> None:
        self.blocked = True
        self._timer += 1
        if self._io is not None:
            timer = self._timer
            self._io.call_later(delay, lambda: self._unblock(timer))

    def _unblock(self, timer: int) -> None:
        if timer == self._timer and self.blocked:
            self.blocked = False
            self._on_unblocked()

    def reset(self) -> None:
        """The device was reset: no block outlives it (its timer does nothing)."""
        self.blocked = False
        self._timer += 1
