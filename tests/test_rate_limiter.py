"""Firecracker's token buckets (src/vmm/src/rate_limiter): the rules one bucket keeps, and a
throttled disk that carries on by its limiter's timer alone. Linux's drivers under limits are
in the nested test bed (tests/linux/test_rate_limiter.py)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt.config import jsonconfig
from altovirt.config.firecracker import FirecrackerConfig, FirecrackerError, export_rate_limiter, rate_limiter
from altovirt.config.model import ConfigError, RateLimiterConfig, TokenBucketConfig
from altovirt.config.validate import check_vm
from altovirt.devices.rate_limiter import REFILL_TIMER, RateLimiter, TokenBucket
from altovirt.eventloop import EventLoop

from .test_block import Harness

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now


def test_a_bucket_refills_at_its_rate_and_spends_its_burst_first() -> None:
    clock = Clock()
    b = TokenBucket(TokenBucketConfig(size=1000, refill_time=100, one_time_burst=500), clock)
    assert b.reduce(500) == 0.0 and b.one_time_burst == 0 and b.budget == 1000   # the burst, first
    assert b.reduce(1000) == 0.0 and b.reduce(1) is None                         # then the bucket
    clock.now += 50 * MS                                                         # half the refill time
    assert b.reduce(501) is None and b.reduce(500) == 0.0 and b.reduce(1) is None
    clock.now += 1_000 * MS                                                      # full, never fuller
    assert b.reduce(1000) == 0.0 and b.reduce(1) is None
    b.give_back(10)
    assert b.reduce(10) == 0.0 and b.one_time_burst == 0                         # the burst never returns


def test_a_take_larger_than_the_bucket_blocks_for_the_excess() -> None:
    """Firecracker's OverConsumption: allowed, the bucket emptied, and blocked while the
    excess refills (3000 tokens from a 1000-token, 100 ms bucket: 200 ms)."""
    b = TokenBucket(TokenBucketConfig(size=1000, refill_time=100), Clock())
    assert b.reduce(3000) == pytest.approx(0.2)
    assert b.budget == 0


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 10_000), refill=st.integers(1, 2_000), burst=st.integers(0, 5_000),
       steps=st.lists(st.tuples(st.integers(0, 500 * MS), st.integers(1, 3_000)), max_size=60))
def test_a_bucket_never_gives_more_than_its_rate(size: int, refill: int, burst: int,
                                                 steps: list[tuple[int, int]]) -> None:
    """Whatever is asked when, what a bucket grants (takes within its size) stays within its
    size, its burst and what its rate refilled meanwhile; and a take refused is granted once
    the bucket has had its refill time."""
    clock = Clock()
    b = TokenBucket(TokenBucketConfig(size, refill, burst), clock)
    start, granted = clock.now, 0
    for dt, want in steps:
        clock.now += dt
        if want > size:
            continue
        if b.reduce(want) is None:
            clock.now += refill * MS
            assert b.reduce(want) == 0.0
        granted += want
        assert granted <= size + burst + (clock.now - start) * size // (refill * MS)


def test_an_update_keeps_the_buckets_it_does_not_change() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimiterConfig(TokenBucketConfig(100, 1000), TokenBucketConfig(10, 1000)),
                          lambda: None, clock)
    assert limiter.consume(100, ops=1)
    ops = limiter.ops
    limiter.update(RateLimiterConfig(TokenBucketConfig(200, 1000), TokenBucketConfig(10, 1000)))
    assert limiter.ops is ops and limiter.ops is not None and limiter.ops.budget == 9
    assert limiter.bandwidth is not None and limiter.bandwidth.budget == 200      # new, and full
    limiter.update(RateLimiterConfig(ops=TokenBucketConfig(10, 1000)))
    assert limiter.bandwidth is None and limiter.consume(10 ** 9)


def test_a_refused_operation_gives_its_op_back() -> None:
    limiter = RateLimiter(RateLimiterConfig(TokenBucketConfig(100, 1000), TokenBucketConfig(10, 1000)),
                          lambda: None, Clock())
    assert limiter.consume(60)
    assert not limiter.consume(60) and limiter.blocked
    assert limiter.ops is not None and limiter.ops.budget == 9


@pytest.mark.parametrize(("body", "expected"), [
    ({"bandwidth": {"size": 1 << 20, "refill_time": 1000, "one_time_burst": 4 << 20}},
     RateLimiterConfig(bandwidth=TokenBucketConfig(1 << 20, 1000, 4 << 20))),
    ({"ops": {"size": 100, "refill_time": 1000, "one_time_burst": None}},
     RateLimiterConfig(ops=TokenBucketConfig(100, 1000))),
    ({"ops": {"size": 0, "refill_time": 1000}}, None),          # a bucket of 0 is no bucket
    ({"bandwidth": None, "ops": None}, None),
    ({}, None),
    ({"ops": {"size": 5, "refill_time": 10, "comment": "ignored"}},   # TokenBucket's serde takes it
     RateLimiterConfig(ops=TokenBucketConfig(5, 10))),
])
def test_firecrackers_rate_limiter_bodies(body: dict[str, object],
                                          expected: RateLimiterConfig | None) -> None:
    assert rate_limiter("rate_limiter", body) == expected
    if expected is not None:
        assert rate_limiter("rate_limiter", export_rate_limiter(expected)) == expected


@pytest.mark.parametrize(("body", "message"), [
    ({"iops": {}}, "unknown field `iops`"),
    ({"ops": {"size": 1}}, "missing field `refill_time`"),
    ({"ops": {"size": -1, "refill_time": 1}}, "invalid value: integer `-1`, expected u64"),
    ({"ops": {"size": True, "refill_time": 1}}, "must be an integer"),
    ({"ops": 7}, "must be an object"),
])
def test_bad_rate_limiter_bodies(body: dict[str, object], message: str) -> None:
    with pytest.raises(FirecrackerError) as e:
        rate_limiter("rate_limiter", body)
    assert message in str(e.value)


def test_put_drive_keeps_its_limiter(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    c = FirecrackerConfig()
    limiter = {"bandwidth": {"size": 5000, "one_time_burst": None, "refill_time": 100},
               "ops": {"size": 200, "one_time_burst": 10, "refill_time": 1000}}
    c.put_drive("d", {"drive_id": "d", "path_on_host": str(disk), "is_root_device": False,
                      "rate_limiter": limiter})
    assert c.export()["drives"][0]["rate_limiter"] == limiter
    assert c.drives["d"].drive.rate_limiter == rate_limiter("rate_limiter", limiter)


def test_a_throttled_disk_resumes_on_its_timer(tmp_path: Path, io: EventLoop) -> None:
    """20 reads posted with one notification through a limit of 5 operations, refilled in
    500 ms: 5 at once, the other 15 at 10 a second as the limiter's timer brings them in,
    with no notification more."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    h = Harness(img, RateLimiterConfig(ops=TokenBucketConfig(size=5, refill_time=500)), io)
    try:
        for i in range(20):
            h.post_read(i * 8, 4096)
        start = time.monotonic()
        io.call_later(0, lambda: h.dev.queue_notify(0))
        deadline = start + 10
        while h.drv.used_idx() < 5:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        first = time.monotonic() - start
        while h.drv.used_idx() < 20:
            assert time.monotonic() < deadline, f"{h.drv.used_idx()} of 20 done"
            time.sleep(0.001)
        took = time.monotonic() - start
        # The limit holds (never faster); the timer, not a notification, brought the rest in
        # (without it they would wait for ever). The upper bounds leave room for a busy host.
        assert first < 1.0, first
        assert 1.5 - REFILL_TIMER <= took < 4, took
        assert h.dev.counters["rate_limiter_throttled_events"] > 0 and not h.resets
    finally:
        h.close()


@pytest.mark.parametrize(("extra", "message"), [
    ({"net": [{"iface_id": "n0", "host_dev_name": "tap9", "vhost": True,
               "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}]},
     "-netdev id=n0: vhost=on takes no rate limiter"),
    ({"net": [{"iface_id": "n0", "host_dev_name": "tap9", "vhost": True}],
      "mmds": {"network_interfaces": ["n0"]}}, "-netdev id=n0: vhost=on cannot carry MMDS"),
])
def test_a_vhost_nic_refuses_what_the_vmm_never_sees(extra: dict[str, object], message: str,
                                                     tmp_path: Path) -> None:
    """The host kernel moves a vhost NIC's frames, so a limiter or MMDS on it would do nothing:
    refused, not ignored."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0" * 64)
    cfg = jsonconfig.from_dict({"boot-source": {"kernel_image_path": str(kernel)}, **extra})
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_vm(cfg)
