"""When a live migration stops copying while the guest runs, and how fast it may send.

QEMU's policy: passes go on while what is still dirty could not be sent within
the downtime limit at the bandwidth measured so far (capped at max-bandwidth);
after :data:`MAX_PASSES` the guest is stopped regardless, as a guest that writes
faster than the link carries would otherwise never be moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .progress import Stats

MAX_PASSES = 30                     # pre-copy passes before the guest is stopped regardless


@dataclass
class Parameters:
    max_bandwidth: int = 128 << 20  # bytes a second (QEMU's default); 0: no cap
    downtime_limit: int = 300       # ms the guest may stay stopped for the last copy


def last_pass(stats: Stats, params: Parameters) -> bool:
    """Whether ``stats.remaining`` bytes fit the downtime limit now (or the passes are spent)."""
    bandwidth = stats.transferred / max(time.monotonic() - stats.start, 1e-3)
    if params.max_bandwidth:
        bandwidth = min(bandwidth, params.max_bandwidth)
    return stats.remaining <= bandwidth * params.downtime_limit / 1000 or stats.passes >= MAX_PASSES


def throttle(stats: Stats, params: Parameters) -> None:
    """Keep to max-bandwidth: sleep off whatever was sent ahead of it."""
    cap = params.max_bandwidth
    if cap:
        ahead = stats.transferred / cap - (time.monotonic() - stats.start - stats.setup_time)
        if ahead > 0:
            time.sleep(ahead)
