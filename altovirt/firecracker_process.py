"""The ``altovirt-firecracker`` process once its flags are read (:mod:`.firecracker`):
the VMM imported, the sandbox on, the API served, and the VM built and run when
``InstanceStart`` or ``snapshot/load`` comes (or at once with ``--config-file``).

The VM is built on the main thread, while the API thread, confined from its
start, keeps answering; a launch that fails leaves the process to be
configured again. The VM runs through :func:`.vmm.run.run_vm`, as under the
``altovirt`` command.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Protocol, cast

from .api import serve_qmp
from .api.firecracker import FirecrackerApi, put_metadata
from .api.http import HttpServer
from .backends import BackendError
from .config.firecracker import LOG_LEVELS, FirecrackerError, LoggerConfig, log_level, os_error
from .config.model import VmConfig
from .config.validate import check_vm
from .devices.legacy.boottimer import process_start_monotonic
from .errors import AltoVirtError, UsageError
from .sandbox import seccomp
from .vmm.actions import QueryCounters
from .vmm.daemon import Daemon
from .vmm.instance import Instance, Launch
from .vmm.machine import Machine
from .vmm.metrics import PERIOD, Metrics
from .vmm.run import enable_seccomp, log_to, run_forked, run_vm

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .vmm.fork import Overrides
    from .vmm.snapshot import SavedVm

log = logging.getLogger("altovirt")


# Firecracker's thread names (src/firecracker/src/api_server_adapter.rs, src/vmm/src/vstate/vcpu.rs);
# the main thread keeps the process's name, and Rust's name for it, "main", in the log.
API_THREAD_NAME = "fc_api"
VCPU_THREAD_NAME = "fc_vcpu {}"
MAIN_THREAD_NAME = "main"

_PY_LEVELS = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO,
              "Debug": logging.DEBUG, "Trace": logging.DEBUG, "Off": logging.CRITICAL + 1}


class Flags(Protocol):
    """What the process takes from its command line, checked (``altovirt.firecracker``'s
    ``Options``): stated here, so that the flags flow down and nothing of the front end
    is imported back."""

    api_sock: str | None            # None with --no-api
    instance_id: str
    config_file: str | None
    log_path: str | None
    level: str                      # as given; checked here (log_level)
    show_level: bool
    show_log_origin: bool
    metrics_path: str | None
    boot_timer: bool
    seccomp: bool
    max_payload: int
    metadata: str | None
    mmds_size_limit: int
    enable_pci: bool
    qmp: str | None
    xenstore: str | None


def setup_logging(instance_id: str, cfg: LoggerConfig) -> None:
    """Firecracker's log lines (``TIME [ID:THREAD] message``) to ``cfg.log_path`` (a file or
    a named pipe) at ``cfg.level``; without a path, warnings and errors on stderr.
    FirecrackerError if the file cannot be opened."""
    fmt = f"%(asctime)s [{instance_id}:%(threadName)s]"
    fmt += " %(levelname)s" if cfg.show_level else ""
    fmt += " %(pathname)s:%(lineno)d" if cfg.show_log_origin else ""
    level = _PY_LEVELS[cfg.level]
    try:
        log_to(cfg.log_path, logging.Formatter(f"{fmt} %(message)s"),
               level if cfg.log_path is not None else max(level, logging.WARNING))
    except (OSError, ValueError) as e:         # ValueError: a NUL in the path
        raise FirecrackerError(f"Logger error: {cfg.log_path}: {os_error(e)}.") from e


class Process:
    """One ``altovirt-firecracker`` process: its instance, API server and launches."""

    def __init__(self, opts: Flags, instance: Instance) -> None:
        self.opts = opts
        self.instance = instance
        started = process_start_monotonic()
        self.metrics = Metrics(instance.id, int((time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1e6),
                               self._device_counters)
        self.api: HttpServer | None = None
        self.daemon = Daemon(None)
        self.signalled = 0

    def _device_counters(self) -> dict[str, dict[str, int]] | None:
        """The running VM's counters for the metrics (None before the start, or once it stops)."""
        machine = self.instance.machine
        if machine is None:
            return None
        try:
            return cast(dict[str, dict[str, int]], machine.request(QueryCounters()))
        except AltoVirtError:
            return None

    def start_api(self, sock: socket.socket | None, flag: str = "--api-sock") -> None:
        """Serve the API at ``opts.api_sock``, on ``sock`` if it listens there already;
        UsageError naming ``flag`` if it cannot."""
        assert self.opts.api_sock is not None
        handler = FirecrackerApi(self.instance, self.metrics,
                                 functools.partial(setup_logging, self.instance.id))
        try:
            self.api = HttpServer(self.opts.api_sock, handler, name=API_THREAD_NAME,
                                  max_payload=self.opts.max_payload,
                                  on_start=functools.partial(seccomp.confine, "api"), sock=sock)
        except BackendError as e:
            raise UsageError(f"{flag}: {e.strerror}") from e
        self.api.io.call_later(PERIOD, self._periodic_metrics)
        self.api.start()

    def _periodic_metrics(self) -> None:
        assert self.api is not None
        if self.metrics.configured:
            try:
                self.metrics.flush(self.instance.state)
            except FirecrackerError as e:
                log.warning("%s", e)
        self.api.io.call_later(PERIOD, self._periodic_metrics)

    def launches(self, first: Launch | None) -> int:
        """Run what the API (or the configuration file) launches; the exit status."""
        launch = first
        while True:
            if launch is None:
                launch = self.instance.next_launch()
                if launch is None:
                    return 128 + self.signalled
            code = self._run(launch)
            if launch.error is None:
                return code
            if launch is first:         # the configuration file's VM: the process ends, as Firecracker's
                raise launch.error
            self.instance.machine = None
            launch = None               # it never ran: the API may configure and start again

    def _run(self, launch: Launch) -> int:
        cfg = launch.cfg
        cfg.vcpu_thread_name = VCPU_THREAD_NAME
        if self.opts.qmp:
            cfg.api_channel = f"unix:{self.opts.qmp}"
        if self.opts.xenstore:
            cfg.xenstore = self.opts.xenstore
        launched_at = time.monotonic()

        def built(machine: Machine) -> None:
            self.instance.built(machine, launch.restore)
            if self.opts.boot_timer and machine.devices is not None:
                machine.devices.boot_timer.count_from(launched_at, "InstanceStart")

        try:
            check_vm(cfg)               # here, not on the API thread: it looks at the files
            return run_vm(cfg, self.daemon, sandbox=False, migratable=True, serve_api=serve_qmp,
                          on_built=built, on_running=launch.running, saved=launch.saved,
                          run_child=self.run_forked)
        except AltoVirtError as e:
            if launch.answered:
                raise
            what = "Load snapshot" if launch.restore else "Start microvm"
            launch.failed(FirecrackerError(f"{what} error: {e}", exit_status=e.exit_status))
            return e.exit_status

    def run_forked(self, cfg: VmConfig, o: Overrides, saved: SavedVm, mem: GuestMemory,
                   report_fd: int) -> int:
        """A forked VM's process (PUT /snapshot/fork, or QMP's vm-fork): a process of its own
        (the same instance id and configuration, with the child's devices) that serves the
        Firecracker API on ``o.api_sock`` (none without) and runs the VM; the exit status."""
        opts = copy.copy(self.opts)
        opts.api_sock, opts.metrics_path, opts.config_file = o.api_sock, None, None
        instance = Instance(self.instance.id, copy.deepcopy(self.instance.config))
        instance.config.restored_from(cfg)
        instance.config.serial_out_path = cfg.serial_out_path
        child = Process(opts, instance)

        def built(machine: Machine) -> None:
            instance.built(machine, self.instance.restored)
            if o.api_sock is not None:
                child.start_api(None, "api_sock")

        try:
            return run_forked(cfg, o, saved, mem, report_fd, sandbox=False, serve_api=serve_qmp,
                              on_built=built, run_child=child.run_forked)
        finally:
            child.close()

    def on_signal(self, signum: int, frame: object) -> None:
        """Before any launch a signal ends the process (the VM's own handler takes over after)."""
        self.signalled = signum
        self.instance.stop_waiting()

    def close(self) -> None:
        if self.api is not None:
            self.api.close(flush_timeout=1.0)


def _read_json(flag: str, path: str) -> object:
    """The JSON document in the file a flag names (UsageError naming what is wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"{flag}: {path}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{flag}: {path}: not valid JSON ({e})") from e


def _from_file(instance: Instance, path: str) -> VmConfig:
    """The VM of a ``--config-file``, checked (UsageError naming what is wrong)."""
    doc = _read_json("--config-file", path)
    try:
        instance.config.load_document(doc)
        return check_vm(instance.config.vm_config(instance.id))
    except AltoVirtError as e:
        raise UsageError(f"--config-file: {path}: {e}") from e


def _metadata(instance: Instance, path: str) -> None:
    """MMDS's first document, from ``--metadata`` (UsageError naming what is wrong)."""
    data = _read_json("--metadata", path)
    try:
        put_metadata(instance.config, data)
    except AltoVirtError as e:
        raise UsageError(f"--metadata: {path}: {e}") from e


def serve(opts: Flags, sock: socket.socket | None) -> int:
    """Run the process whose API socket (if any) ``sock`` already listens; the exit status.
    What stops it early is logged and raised for the caller to say: AltoVirtError (bad
    flags, a configuration file or a VM that cannot start) or any other (a bug)."""
    threading.main_thread().name = MAIN_THREAD_NAME
    instance = Instance(opts.instance_id)
    process = Process(opts, instance)
    try:
        level = log_level(opts.level)
        if level is None:
            raise UsageError(f"--level: {opts.level!r}; accepted: {', '.join(LOG_LEVELS)}")
        setup_logging(opts.instance_id, LoggerConfig(opts.log_path, level, opts.show_level,
                                                     opts.show_log_origin))
        instance.config.enable_pci = opts.enable_pci
        if opts.metrics_path:
            process.metrics.open(instance.config.put_metrics({"metrics_path": opts.metrics_path}))
        instance.config.mmds_size_limit = opts.mmds_size_limit
        if opts.metadata:
            _metadata(instance, opts.metadata)
        first = Launch(_from_file(instance, opts.config_file)) if opts.config_file else None
        if opts.seccomp:
            # Every filter read (or compiled) now, before the API answers: none on the way to the guest.
            enable_seccomp(opts.log_path)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, process.on_signal)
        if sock is not None:
            process.start_api(sock)
            sock = None                 # the server's now, and closed with it
        return process.launches(first)
    except AltoVirtError as e:
        if opts.log_path:               # without a log file the caller's line is the whole report
            log.error("%s", e)
        raise
    except Exception:
        log.exception("internal error")
        raise
    finally:
        if sock is not None:            # never served: the path goes too
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(opts.api_sock or "")
        process.close()
        logging.shutdown()
