"""The ``altovirt`` command: parse, build, run, and map the outcome to an exit status.

Exit status: 0 the guest powered off or reset (or Ctrl-A x), 1 a VMM or KVM
error, 2 a usage or configuration error, 3 a guest panic, 128+N stopped by
signal N. Errors are one line on stderr; tracebacks appear only with
-debug or in the -D log file.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from . import IMPORT_STARTED
from .backends import BackendError
from .config import ConfigError, HelpRequested, VmConfig, load_config
from .errors import EXIT_ERROR, EXIT_USAGE, AltoVirtError, exit_now
from .sandbox import seccomp
from .vmm import builder
from .vmm.daemon import Daemon
from .vmm.machine import Machine, VmmError

if TYPE_CHECKING:
    from .api.qmp import QmpServer
    from .xenstore.server import XenStoreServer

log = logging.getLogger("altovirt")


class _OneLineFormatter(logging.Formatter):
    """Leaves tracebacks out of the terminal; the log file keeps them."""

    def formatException(self, ei: object) -> str:  # noqa: N802 (logging's name)
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = ""
        saved, record.exc_info = record.exc_info, None
        try:
            return super().format(record)
        finally:
            record.exc_info = saved


def setup_logging(cfg: VmConfig) -> None:
    root = logging.getLogger("altovirt")
    root.handlers.clear()
    root.propagate = False
    fmt = "%(asctime)s.%(msecs)03d %(levelname)s [%(threadName)s] %(name)s: %(message)s"
    if cfg.log_file or cfg.log_stderr:      # -D alone: the whole log, on stderr
        handler: logging.Handler = (logging.FileHandler(cfg.log_file) if cfg.log_file
                                    else logging.StreamHandler(sys.stderr))
        handler.setFormatter(logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"))
        root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    else:
        handler = logging.StreamHandler(sys.stderr)
        if cfg.debug:
            handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        else:
            handler.setFormatter(_OneLineFormatter("altovirt: %(levelname)s: %(message)s"))
        root.setLevel(logging.DEBUG if cfg.debug else logging.WARNING)
    root.addHandler(handler)


def start_qmp(machine: Machine, path: str) -> QmpServer:
    from .api import commands  # only a VM with a QMP channel imports them
    from .api.qmp import QmpServer
    try:
        fds: dict[str, int] = {}
        qmp = QmpServer(path, commands.build(machine, fds), commands.version(),
                        functools.partial(seccomp.confine, "api"), named_fds=fds)
    except BackendError as e:
        raise VmmError(f"-api-channel: {e.strerror}", exit_status=EXIT_USAGE) from e
    machine.add_event_listener(qmp.event)
    qmp.start()
    return qmp


def start_xenstore(machine: Machine, path: str) -> XenStoreServer:
    from .xenstore.server import GUEST_VSOCK_PORT, XenStoreServer  # only with -xenstore
    assert machine.xenstore is not None
    try:
        server = XenStoreServer(path, machine.xenstore, functools.partial(seccomp.confine, "api"))
    except BackendError as e:
        raise VmmError(f"-xenstore: {e.strerror}", exit_status=EXIT_USAGE) from e
    if machine.vsock is not None:
        machine.vsock.serve(GUEST_VSOCK_PORT, server.guest_socket)
    server.start()
    return server


def start_migration(machine: Machine, migratable: bool) -> Callable[[], None]:
    """A ``migratable`` VM (one with a QMP channel or -incoming, or a Firecracker API) can
    migrate; with -incoming it waits in inmigrate, listening for the source already.
    Returns what starts the load once the VM runs."""
    cfg = machine.cfg
    if not migratable:
        return lambda: None
    from .vmm.migration import Migration
    from .vmm.precopy import MigrationError, listen
    migration = machine.migration = Migration(machine)
    incoming = cfg.incoming
    if incoming is None:
        return lambda: None
    machine.expect_incoming()
    from .vmm import snapshot  # noqa: F401 (imported now, so that the load costs only the load)
    if incoming.uri is None:
        return lambda: None         # -incoming defer: QMP migrate-incoming starts it
    try:
        listener = listen(incoming.uri) if incoming.uri.kind != "file" else None
    except MigrationError as e:
        raise VmmError(str(e), exit_status=EXIT_USAGE) from e
    return lambda: migration.incoming(incoming, listener)


def enable_seccomp(cfg: VmConfig) -> None:
    """Threads started from here on confine themselves; a forbidden call is reported
    in the -D log (or on stderr) before the VMM ends."""
    report = open(cfg.log_file, "a") if cfg.log_file else sys.stderr     # noqa: SIM115 (kept for life)
    try:
        seccomp.enable(report)
    except seccomp.SeccompError as e:
        raise VmmError(str(e)) from e


def _error(msg: str) -> None:
    sys.stderr.write(f"altovirt: error: {msg}\n")
    sys.stderr.flush()


class Budget:
    """The start-up budget: how long each phase took, logged (-D) once the VM runs."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last = IMPORT_STARTED

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, (now - self._last) * 1000))
        self._last = now

    def report(self) -> None:
        log.info("start-up: %s", ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.phases))


def run_vm(cfg: VmConfig, daemon: Daemon, *, sandbox: bool, migratable: bool,
           on_built: Callable[[Machine], None] | None = None,
           on_running: Callable[[], None] | None = None, budget: Budget | None = None) -> int:
    """Build the VM, start its services and run it until it stops; the exit status.
    ``sandbox``: turn seccomp on once it is built (a caller that turned it on earlier
    passes False). ``migratable``: it can be snapshotted or migrated. AltoVirtError if
    it cannot be built or run; whatever was made is released either way."""
    machine = qmp = xenstore = None
    budget = budget or Budget()
    try:
        machine = builder.build(cfg)
        budget.mark("build")
        log.info("VM %s: %d vCPU(s), %d MiB", cfg.name, cfg.vcpus, cfg.mem_size >> 20)
        start_incoming = start_migration(machine, migratable)
        if sandbox:
            enable_seccomp(cfg)
        if machine.migration is not None:
            machine.migration.start()       # its thread confines itself
        if cfg.api_channel:
            qmp = start_qmp(machine, cfg.api_channel[len("unix:"):])
        if cfg.xenstore:
            xenstore = start_xenstore(machine, cfg.xenstore)
        if on_built is not None:
            on_built(machine)
        budget.mark("services")

        def running() -> None:
            budget.mark("vCPUs started")
            budget.report()
            daemon.report(None)
            if on_running is not None:
                on_running()
            start_incoming()
        reason = machine.run(running)
        log.info("VM %s stopped: %s (exit %d)", cfg.name, reason.reason, reason.exit_code)
        if machine.migration is not None and machine.migration.incoming_error:
            _error(machine.migration.incoming_error)
        return reason.exit_code
    finally:
        if xenstore is not None:
            xenstore.close()
        if qmp is not None:
            qmp.close()             # after the SHUTDOWN event has been queued for every client
        if machine is not None and machine.migration is not None:
            machine.migration.close()
        if machine is not None:
            machine.close()


def main(argv: list[str] | None = None) -> int:
    budget = Budget()
    budget.mark("imports")
    argv = sys.argv[1:] if argv is None else argv
    debug = "-debug" in argv or "--debug" in argv
    try:
        cfg = load_config(argv)
    except HelpRequested as h:
        sys.stdout.write(str(h))
        return h.exit_status
    except ConfigError as e:
        _error(str(e))
        return e.exit_status
    setup_logging(cfg)
    daemon = Daemon(cfg.pidfile)
    if cfg.daemonize:
        daemon.detach()
    budget.mark("configuration")
    try:
        return run_vm(cfg, daemon, sandbox=cfg.seccomp, migratable=bool(cfg.api_channel or cfg.incoming),
                      budget=budget)
    except AltoVirtError as e:
        report_error(cfg, daemon, e, debug)
        return e.exit_status
    except Exception as e:
        log.exception("internal error")
        daemon.report(f"internal error: {e}")
        if debug:
            raise
        _error(f"internal error: {e} (run with -debug for a traceback)")
        return EXIT_ERROR
    finally:
        daemon.cleanup()
        logging.shutdown()


def report_error(cfg: VmConfig, daemon: Daemon, e: AltoVirtError, debug: bool) -> None:
    """The one line that says why the VMM stops (and the traceback with -debug)."""
    if cfg.log_file:        # without -D the line below is the whole report
        log.error("%s", e, exc_info=cfg.debug)
    daemon.report(str(e))
    if debug:                   # the error and what caused it, on the terminal too
        traceback.print_exception(e)
    _error(str(e))


def run() -> NoReturn:
    """The console-script entry point (see errors.exit_now)."""
    exit_now(main())
