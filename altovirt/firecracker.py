"""``altovirt-firecracker``: AltoVirt with Firecracker's command line and REST API.

A tool that runs ``firecracker --api-sock PATH`` (or ``--config-file FILE``
with or without ``--no-api``) and then drives the API socket runs this the
same way. The process imports what a VM needs, turns the sandbox on and
opens its API socket; the VM is built when ``InstanceStart`` (or
``snapshot/load``) comes, on the main thread, while the API thread, already
confined, keeps answering. The guest's serial console is the process's
standard output, as in Firecracker. ``--qmp PATH`` serves QMP for the same
VM besides (hot-plug, the XenStore's commands, migration).

Exit status: the VM's (0 when the guest powers off or reboots, see
``altovirt.cli``), 2 for a usage error, 128+N after signal N before any start.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from . import __version__, cli
from .api.firecracker import FIRECRACKER_API_VERSION, FirecrackerApi
from .api.http import DEFAULT_MAX_PAYLOAD, HttpServer
from .backends import BackendError
from .config.firecracker import LOG_LEVELS, FirecrackerError, LoggerConfig
from .config.model import VmConfig
from .config.validate import check_vm
from .devices.legacy.boottimer import process_start_monotonic
from .errors import EXIT_ERROR, EXIT_USAGE, AltoVirtError
from .sandbox import seccomp
from .vmm.daemon import Daemon
from .vmm.instance import Instance, Launch
from .vmm.machine import Machine
from .vmm.metrics import PERIOD, Metrics

log = logging.getLogger("altovirt")

PROG = "altovirt-firecracker"
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"
# Firecracker's flags for what AltoVirt does not have: refused with this reason.
UNSUPPORTED_FLAGS = {"--seccomp-filter": "custom seccomp filters (AltoVirt's are built in; see --no-seccomp)",
                     "--metadata": "MMDS (the metadata service)", "--enable-pci": "PCI devices"}


class UsageError(AltoVirtError):
    exit_status = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class Options:
    api_sock: str | None
    instance_id: str
    config_file: str | None
    log: LoggerConfig
    metrics_path: str | None
    boot_timer: bool
    seccomp: bool
    max_payload: int
    qmp: str | None
    version: bool


def parse(argv: Sequence[str]) -> Options:
    p = _Parser(prog=PROG, description="AltoVirt, driven like Firecracker: its flags and its REST API.")
    p.add_argument("--api-sock", default=DEFAULT_API_SOCK, metavar="PATH")
    p.add_argument("--id", default=DEFAULT_ID, help="the microVM's id (letters, digits and '-', at most 64)")
    p.add_argument("--config-file", metavar="FILE", help="Firecracker's JSON configuration: boot at once")
    p.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    p.add_argument("--log-path", metavar="PATH")
    p.add_argument("--level", default="Info", metavar="LEVEL", help=", ".join(LOG_LEVELS))
    p.add_argument("--module", metavar="MODULE", help="accepted; AltoVirt logs every module")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--metrics-path", metavar="PATH")
    p.add_argument("--boot-timer", action="store_true",
                   help="log the guest's boot-timer writes as time since InstanceStart")
    p.add_argument("--no-seccomp", action="store_true")
    p.add_argument("--http-api-max-payload-size", type=int, default=DEFAULT_MAX_PAYLOAD, metavar="BYTES")
    p.add_argument("--mmds-size-limit", type=int, metavar="BYTES", help="accepted; AltoVirt has no MMDS")
    for flag in ("--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"):
        p.add_argument(flag, type=int, metavar="US", help="accepted (the jailer's timing hints)")
    p.add_argument("--qmp", metavar="PATH", help="serve QMP on this unix socket too (AltoVirt)")
    p.add_argument("--version", action="store_true")
    for flag in UNSUPPORTED_FLAGS:
        p.add_argument(flag, nargs="?", const="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for flag, what in UNSUPPORTED_FLAGS.items():
        if getattr(a, flag[2:].replace("-", "_")) is not None:
            raise UsageError(f"{flag}: AltoVirt has no {what}")
    if a.no_api and not a.config_file:
        raise UsageError("--no-api needs --config-file (nothing could start the VM otherwise)")
    if not 0 < len(a.id) <= 64 or not a.id.replace("-", "").isalnum() or not a.id.isascii():
        raise UsageError(f"--id: {a.id!r} may hold only letters, digits and '-' (1 to 64 of them)")
    if a.http_api_max_payload_size <= 0:
        raise UsageError("--http-api-max-payload-size: must be a positive number of bytes")
    level = {v.lower(): v for v in LOG_LEVELS}.get(a.level.lower())
    if level is None:
        raise UsageError(f"--level: {a.level!r}; accepted: {', '.join(LOG_LEVELS)}")
    return Options(None if a.no_api else a.api_sock, a.id, a.config_file,
                   LoggerConfig(a.log_path, level, a.show_level, a.show_log_origin), a.metrics_path,
                   a.boot_timer, not a.no_seccomp, a.http_api_max_payload_size, a.qmp, a.version)


_PY_LEVELS = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO,
              "Debug": logging.DEBUG, "Trace": logging.DEBUG, "Off": logging.CRITICAL + 1}


def setup_logging(instance_id: str, cfg: LoggerConfig) -> None:
    """Firecracker's log lines (``TIME [ID:THREAD] message``) to ``cfg.log_path`` (a file or
    a named pipe) at ``cfg.level``; without a path, warnings and errors on stderr."""
    root = logging.getLogger("altovirt")
    fmt = f"%(asctime)s [{instance_id}:%(threadName)s]"
    fmt += " %(levelname)s" if cfg.show_level else ""
    fmt += " %(pathname)s:%(lineno)d" if cfg.show_log_origin else ""
    if cfg.log_path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        level = max(_PY_LEVELS[cfg.level], logging.WARNING)
    else:
        try:
            handler = logging.FileHandler(cfg.log_path)     # appends; a named pipe is written as it is read
        except OSError as e:
            raise FirecrackerError(f"Logger error: {cfg.log_path}: {e.strerror}.") from e
        level = _PY_LEVELS[cfg.level]
    handler.setFormatter(logging.Formatter(f"{fmt} %(message)s"))
    root.handlers.clear()
    root.propagate = False
    root.setLevel(level)
    root.addHandler(handler)


class Process:
    """One ``altovirt-firecracker`` process: its instance, API server and launches."""

    def __init__(self, opts: Options, instance: Instance) -> None:
        self.opts = opts
        self.instance = instance
        started = process_start_monotonic()
        self.metrics = Metrics(instance.id, int((time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1e6))
        self.api: HttpServer | None = None
        self.daemon = Daemon(None)
        self.signalled = 0

    def start_api(self) -> None:
        assert self.opts.api_sock is not None
        handler = FirecrackerApi(self.instance, self.metrics,
                                 functools.partial(setup_logging, self.instance.id))
        try:
            self.api = HttpServer(self.opts.api_sock, handler, max_payload=self.opts.max_payload,
                                  on_start=functools.partial(seccomp.confine, "api"))
        except BackendError as e:
            raise UsageError(f"--api-sock: {e.strerror}") from e
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

    def serve(self, first: Launch | None) -> int:
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
            self.instance.machine = None
            launch = None               # it never ran: the API may configure and start again

    def _run(self, launch: Launch) -> int:
        cfg = launch.cfg
        if self.opts.qmp:
            cfg.api_channel = f"unix:{self.opts.qmp}"
        launched_at = time.monotonic()

        def built(machine: Machine) -> None:
            self.instance.built(machine, launch.restore)
            if self.opts.boot_timer and machine.devices is not None:
                machine.devices.boot_timer.count_from(launched_at, "InstanceStart")
            if launch.restore:
                assert machine.migration is not None
                machine.migration.on_incoming_end = lambda error: (
                    launch.running() if error is None
                    else launch.failed(FirecrackerError(f"Load snapshot error: {error}")))

        try:
            check_vm(cfg)               # here, not on the API thread: it looks at the files
            return cli.run_vm(cfg, self.daemon, sandbox=False, migratable=True, on_built=built,
                              on_running=None if launch.restore else launch.running)
        except AltoVirtError as e:
            if launch.answered:
                raise
            what = "Load snapshot" if launch.restore else "Start microvm"
            launch.failed(FirecrackerError(f"{what} error: {e}"))
            return e.exit_status

    def on_signal(self, signum: int, frame: object) -> None:
        """Before any launch a signal ends the process (the VM's own handler takes over after)."""
        self.signalled = signum
        self.instance.stop_waiting()

    def close(self) -> None:
        if self.api is not None:
            self.api.close(flush_timeout=1.0)


def _error(msg: str) -> None:
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
    except UsageError as e:
        _error(str(e))
        return e.exit_status
    except SystemExit as e:                     # --help
        return int(e.code or 0)
    if opts.version:
        sys.stdout.write(f"Firecracker v{FIRECRACKER_API_VERSION} (AltoVirt {__version__}, "
                         "its API and flags)\n\n")
        return 0
    instance = Instance(opts.instance_id)
    process = Process(opts, instance)
    try:
        setup_logging(opts.instance_id, opts.log)
        if opts.metrics_path:
            process.metrics.open(instance.config.put_metrics({"metrics_path": opts.metrics_path}))
        first = None
        if opts.config_file:
            first = Launch(_from_file(instance, opts.config_file))
        if opts.seccomp:
            cli.enable_seccomp(VmConfig(log_file=opts.log.log_path))
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, process.on_signal)
        if opts.api_sock is not None:
            process.start_api()
        return process.serve(first)
    except AltoVirtError as e:
        if opts.log.log_path:          # without a log file the line below is the whole report
            log.error("%s", e)
        _error(str(e))
        return e.exit_status
    except Exception as e:
        log.exception("internal error")
        _error(f"internal error: {e}")
        return EXIT_ERROR
    finally:
        process.close()
        logging.shutdown()


def _from_file(instance: Instance, path: str) -> VmConfig:
    """The VM of a ``--config-file``, checked (UsageError naming what is wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise UsageError(f"--config-file: {path}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:
        raise UsageError(f"--config-file: {path}: not valid JSON ({e})") from e
    try:
        instance.config.load_document(doc)
        return check_vm(instance.config.vm_config(instance.id))
    except AltoVirtError as e:
        raise UsageError(f"--config-file: {path}: {e}") from e


def run() -> NoReturn:
    """Console-script entry point; exits without interpreter teardown, as ``altovirt`` does."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
