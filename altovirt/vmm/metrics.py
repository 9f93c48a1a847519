"""Firecracker-style metrics: one JSON object a line, appended to a file or a named pipe.

A line is written on ``FlushMetrics`` and every :data:`PERIOD` seconds once
metrics are configured. Like Firecracker's, counters count since the previous
line: the API's requests (per method and resource, and the failures), and once
the VM runs its devices' (Firecracker's groups and field names: ``block`` and
``block_ID``, ``net`` and ``net_ID``, ``mmds``, ``balloon``, ``entropy``,
``vsock``, ``uart``, ``vcpu``; a field AltoVirt does not count stays 0), with
the VM's state, the process's start-up time, and how long the last pause, resume, snapshot
and load took (``latencies_us``). The devices' latency aggregates are left out.
"""

from __future__ import annotations

import collections
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config.firecracker import FirecrackerError, MetricsConfig, os_error

PERIOD = 60.0                           # seconds, as Firecracker
# Firecracker's fields of each group (src/vmm/src/devices/virtio/*/metrics.rs, logger/metrics.rs).
FIELDS: dict[str, tuple[str, ...]] = {k: tuple(v.split()) for k, v in {
    "block": "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count "
        "flush_count queue_event_count rate_limiter_event_count update_count update_fails read_bytes "
        "write_bytes read_count write_count rate_limiter_throttled_events io_engine_throttled_events "
        "remaining_reqs_count",
    "net": "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer event_fails "
        "rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled rx_tap_event_count "
        "rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails tap_write_fails tx_bytes_count "
        "tx_malformed_frames tx_fails tx_count tx_packets_count tx_queue_event_count "
        "tx_rate_limiter_event_count tx_rate_limiter_throttled tx_spoofed_mac_count "
        "tx_remaining_reqs_count",
    "mmds": "rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_invalid_token rx_no_token "
        "rx_count tx_bytes tx_count tx_errors tx_frames connections_created connections_destroyed",
    "balloon": "activate_fails inflate_count stats_updates_count stats_update_fails deflate_count "
        "event_fails free_page_report_count free_page_report_freed free_page_report_fails "
        "free_page_hint_count free_page_hint_freed free_page_hint_fails",
    "entropy": "activate_fails entropy_event_fails entropy_event_count entropy_bytes host_rng_fails "
        "entropy_rate_limiter_throttled rate_limiter_event_count",
    "vsock": "activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails ev_queue_event_fails "
        "muxer_event_fails conn_event_fails rx_queue_event_count tx_queue_event_count rx_bytes_count "
        "tx_bytes_count rx_packets_count tx_packets_count conns_added conns_killed conns_removed "
        "killq_resync tx_flush_fails tx_write_fails rx_read_fails",
    "uart": "error_count flush_count missed_read_count missed_write_count read_count write_count "
        "rate_limiter_dropped_bytes",
    "vcpu": "exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures kvmclock_ctrl_fails",
}.items()}
# The API's operations' durations, µs, the last of each (Firecracker's PerformanceMetrics): at the
# API (the whole request) and, with "vmm_", the VMM's part of it.
LATENCIES = tuple(f"{level}{op}" for level in ("", "vmm_") for op in
                  ("full_create_snapshot", "diff_create_snapshot", "load_snapshot", "pause_vm", "resume_vm"))


class Metrics:
    def __init__(self, instance_id: str, startup_us: int,
                 devices: Callable[[], dict[str, dict[str, int]] | None] = lambda: None) -> None:
        """``devices()``: the running VM's counters (vmm/actions.QueryCounters), or None."""
        self.instance_id = instance_id
        self.startup_us = startup_us
        self._devices = devices
        self._vcpu_before: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fd = -1
        self._cfg: MetricsConfig | None = None
        self._requests: collections.Counter[str] = collections.Counter()
        self._failures: collections.Counter[str] = collections.Counter()
        self._latencies = dict.fromkeys(LATENCIES, 0)

    @property
    def configured(self) -> bool:
        return self._fd >= 0

    def open(self, cfg: MetricsConfig) -> None:
        """Write to ``cfg.metrics_path`` from now on (a named pipe is opened without waiting
        for its reader); FirecrackerError if it cannot be opened."""
        path = cfg.metrics_path
        try:
            fifo = stat.S_ISFIFO(os.stat(path).st_mode)
        except FileNotFoundError:
            fifo = False
        except (OSError, ValueError) as e:     # ValueError: a NUL in the path
            raise FirecrackerError(f"Cannot initialize the metrics system: {path}: {os_error(e)}.") from e
        # O_RDWR on a pipe: the open does not wait for a reader, and writes never fail for want of one.
        flags = (os.O_RDWR | os.O_NONBLOCK) if fifo else (os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise FirecrackerError(f"Cannot initialize the metrics system: {path}: {os_error(e)}.") from e
        with self._lock:
            self._fd, self._cfg = fd, cfg

    def count(self, method: str, resource: str) -> None:
        """A request came for ``resource`` (the first segment of its path)."""
        with self._lock:
            self._requests[_key(method, resource)] += 1

    def failed(self, method: str, resource: str) -> None:
        with self._lock:
            self._failures[_key(method, resource)] += 1

    def latency(self, name: str, seconds: float) -> None:
        """An operation of :data:`LATENCIES` took ``seconds``; kept until the next one."""
        with self._lock:
            self._latencies[name] = round(seconds * 1e6)

    def flush(self, state: str) -> None:
        """Write a line of the counters since the last one; FirecrackerError before PUT /metrics."""
        devices = self._devices() if self.configured else None
        with self._lock:
            if self._fd < 0 or self._cfg is None:
                raise FirecrackerError("Metrics system not initialized: PUT /metrics first.")
            line: dict[str, Any] = {
                "utc_timestamp_ms": int(time.time() * 1000),
                "api_server": {"process_startup_time_us": self.startup_us},
                "get_api_requests": _only(self._requests, "_get"),
                "put_api_requests": _only(self._requests, "_put"),
                "patch_api_requests": _only(self._requests, "_patch"),
                "api_request_failures": dict(self._failures),
                "vmm": {"state": state},
                "latencies_us": dict(self._latencies),
            }
            if devices is not None:
                line.update(self._device_groups(devices))
            if self._cfg.emit_id:
                line["id"] = self.instance_id
            if self._cfg.properties:
                line["properties"] = self._cfg.properties
            self._requests.clear()
            self._failures.clear()
            try:
                os.write(self._fd, json.dumps(line).encode() + b"\n")
            except BlockingIOError:
                pass                    # a full pipe nobody reads: this line is lost, as in Firecracker
            except OSError as e:
                raise FirecrackerError(f"Cannot write metrics: {e.strerror}.") from e


    def _device_groups(self, devices: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """Firecracker's device groups: each device's own, and the sums of the disks' and NICs'."""
        vcpu = devices.pop("vcpu", {})
        out: dict[str, dict[str, int]] = {"vcpu": {k: vcpu.get(k, 0) - self._vcpu_before.get(k, 0)
                                                   for k in FIELDS["vcpu"]}}
        self._vcpu_before = vcpu
        for total in ("block", "net"):
            own = {g: c for g, c in devices.items() if g.startswith(f"{total}_")}
            out[total] = {k: sum(c.get(k, 0) for c in own.values()) for k in FIELDS[total]}
            out.update({g: {k: c.get(k, 0) for k in FIELDS[total]} for g, c in own.items()})
        for group in ("mmds", "balloon", "entropy", "uart"):
            out[group] = {k: devices.get(group, {}).get(k, 0) for k in FIELDS[group]}
        if "vsock" in devices:
            out["vsock"] = dict(devices["vsock"])
        return out


def _key(method: str, resource: str) -> str:
    return f"{resource or 'instance_info'}_{method.lower()}"


def _only(counter: collections.Counter[str], suffix: str) -> dict[str, int]:
    return {k[:-len(suffix)] + "_count": v for k, v in counter.items() if k.endswith(suffix)}
