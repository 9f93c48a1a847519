"""Firecracker-style metrics: one JSON object a line, appended to a file or a named pipe.

A line is written on ``FlushMetrics`` and every :data:`PERIOD` seconds once
metrics are configured. Like Firecracker's, counters count since the previous
line; what AltoVirt keeps is the API's requests (per method and resource, and
the failures), the VM's state and the process's start-up time.
"""

from __future__ import annotations

import collections
import json
import os
import stat
import threading
import time
from typing import Any

from ..config.firecracker import FirecrackerError, MetricsConfig

PERIOD = 60.0                           # seconds, as Firecracker


class Metrics:
    def __init__(self, instance_id: str, startup_us: int) -> None:
        self.instance_id = instance_id
        self.startup_us = startup_us
        self._lock = threading.Lock()
        self._fd = -1
        self._cfg: MetricsConfig | None = None
        self._requests: collections.Counter[str] = collections.Counter()
        self._failures: collections.Counter[str] = collections.Counter()

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
        except OSError as e:
            raise FirecrackerError(f"Cannot initialize the metrics system: {path}: {e.strerror}.") from e
        # O_RDWR on a pipe: the open does not wait for a reader, and writes never fail for want of one.
        flags = (os.O_RDWR | os.O_NONBLOCK) if fifo else (os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise FirecrackerError(f"Cannot initialize the metrics system: {path}: {e.strerror}.") from e
        with self._lock:
            self._fd, self._cfg = fd, cfg

    def count(self, method: str, resource: str) -> None:
        """A request came for ``resource`` (the first segment of its path)."""
        with self._lock:
            self._requests[_key(method, resource)] += 1

    def failed(self, method: str, resource: str) -> None:
        with self._lock:
            self._failures[_key(method, resource)] += 1

    def flush(self, state: str) -> None:
        """Write a line of the counters since the last one; FirecrackerError before PUT /metrics."""
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
            }
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


def _key(method: str, resource: str) -> str:
    return f"{resource or 'instance_info'}_{method.lower()}"


def _only(counter: collections.Counter[str], suffix: str) -> dict[str, int]:
    return {k[:-len(suffix)] + "_count": v for k, v in counter.items() if k.endswith(suffix)}
