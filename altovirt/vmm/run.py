"""Running one VM, for both front ends (``altovirt`` and ``altovirt-firecracker``).

:func:`run_vm` builds the VM from its configuration, starts its services (QMP,
the XenStore, migration), turns the sandbox on, runs it until it stops, and
releases everything it made. What differs between the front ends (how the
configuration came, what to do once the VM is built or runs) they pass in;
nothing here knows their command lines. :func:`log_to` is the one place the
process's log is set up, in the format each front end chooses.

Start-up: the QMP server, the XenStore and migration are imported only by a VM
that has them.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import altovirt

from ..backends import BackendError
from ..errors import EXIT_USAGE, VMM_PROG, AltoVirtError, print_error
from ..sandbox import seccomp
from . import builder
from .daemon import Daemon
from .machine import Machine, VmmError

if TYPE_CHECKING:
    from ..config.model import VmConfig
    from ..memory import GuestMemory
    from ..xenstore.server import XenStoreServer
    from .fork import Overrides, RunChild
    from .snapshot import SavedVm

# The package's logger, not this module's: the VM's lines ("VM x stopped") are logged under
# "altovirt", which tools reading the log match (Kata's driver among them).
log = logging.getLogger("altovirt")


class Service(Protocol):
    """A server a VM runs with (QMP), closed once the VM has stopped."""

    def close(self) -> None: ...


# What serves a VM's API channel (the front ends hand in api.commands.serve): vmm/ imports
# nothing of api/, which stands above it.
ServeApi = Callable[[Machine, str], Service]


class WithoutTracebacks(logging.Formatter):
    """``inner``'s lines without their tracebacks: what a terminal shows (a log file keeps
    them, as does -debug)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def log_to(path: str | None, formatter: logging.Formatter, level: int) -> None:
    """Send AltoVirt's log records at ``level`` and above, formatted by ``formatter``, to the
    file ``path`` (appended; a named pipe is written as it is read), or to stderr when None.
    Replaces the set-up in place (Firecracker's API may set the logger again). OSError if the
    file cannot be opened; the set-up in place then stays."""
    handler = logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("altovirt")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(level)
    root.addHandler(handler)


class Budget:
    """The start-up budget: how long each phase took, logged once the VM runs."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last = altovirt.IMPORT_STARTED

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, (now - self._last) * 1000))
        self._last = now

    def report(self) -> None:
        log.info("start-up: %s", ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.phases))


def enable_seccomp(log_path: str | None) -> None:
    """Threads started from here on confine themselves; a forbidden call is reported in the
    log file ``log_path`` (or, without one, on stderr) before the VMM ends. SeccompError
    (exit status 1) if this kernel cannot filter."""
    report = open(log_path, "a") if log_path else sys.stderr     # noqa: SIM115 (kept for life)
    seccomp.enable(report)


def start_xenstore(machine: Machine, path: str) -> XenStoreServer:
    """``machine``'s XenStore served on the unix socket ``path`` (and to the guest on its
    vsock port, if it has a vsock); VmmError (usage) if the socket cannot be made."""
    from ..xenstore.server import GUEST_VSOCK_PORT, XenStoreServer  # only with -xenstore
    assert machine.xenstore is not None
    try:
        server = XenStoreServer(path, machine.xenstore, functools.partial(seccomp.confine, "api"))
    except BackendError as e:
        raise VmmError(f"-xenstore: {e.strerror}", exit_status=EXIT_USAGE) from e
    if machine.vsock is not None:
        machine.vsock.serve(GUEST_VSOCK_PORT, server.guest_socket)
    server.start()
    return server


def start_incoming(machine: Machine) -> Callable[[], None]:
    """With -incoming the VM waits in inmigrate, listening for the source already; returns
    what starts the load once the VM runs."""
    migration, incoming = machine.migration, machine.cfg.incoming
    if migration is None or incoming is None:
        return lambda: None
    machine.expect_incoming()
    from . import snapshot  # noqa: F401 (imported now, so that the load costs only the load)
    if incoming.uri is None:
        return lambda: None                 # -incoming defer: QMP migrate-incoming starts it
    from .precopy import MigrationError, listen
    try:
        listener = listen(incoming.uri) if incoming.uri.kind != "file" else None
    except MigrationError as e:
        raise VmmError(str(e), exit_status=EXIT_USAGE) from e
    return lambda: migration.incoming(incoming, listener)


def run_vm(cfg: VmConfig, daemon: Daemon, *, sandbox: bool, migratable: bool, serve_api: ServeApi,
           on_built: Callable[[Machine], None] | None = None,
           on_running: Callable[[], None] | None = None, budget: Budget | None = None,
           saved: SavedVm | None = None, mem: GuestMemory | None = None,
           run_child: RunChild | None = None) -> int:
    """Build the VM, start its services and run it until it stops; the exit status.
    ``sandbox``: turn seccomp on once it is built (a caller that turned it on earlier
    passes False). ``migratable``: it can be snapshotted, migrated and forked, by
    ``run_child`` (a front end that serves an API of its own in each child passes it) or,
    with an API channel, into :func:`run_forked`'s VM. ``serve_api`` serves its
    -api-channel, if it has one. ``saved``: the
    VM is built from that snapshot (``cfg`` is its configuration; ``mem``, its RAM if that
    is in place already, a forked VM's), and runs if it says so. ``on_built`` gets the
    machine once its services run, ``on_running`` is told once its vCPUs do. AltoVirtError
    if it cannot be built or run; whatever was made is released either way. A load that
    fails stops the VM; its reason is then the VMM's error line on stderr."""
    machine = qmp = xenstore = None
    budget = budget or Budget()
    try:
        machine = builder.build(cfg, migratable=migratable, saved=saved, mem=mem)
        budget.mark("build")
        log.info("VM %s: %d vCPU(s), %d MiB", cfg.name, cfg.vcpus, cfg.mem_size >> 20)
        start_load = start_incoming(machine)
        if sandbox:
            enable_seccomp(cfg.log_file)
        if machine.migration is not None:
            machine.migration.start()       # its thread confines itself
            if run_child is None and cfg.api_channel:
                run_child = functools.partial(run_forked, sandbox=sandbox, serve_api=serve_api)
            if run_child is not None:
                from .fork import Forker
                machine.forker = Forker(run_child)
                machine.forker.start()      # so does its
        if cfg.api_channel:
            qmp = serve_api(machine, cfg.api_channel[len("unix:"):])
        if cfg.xenstore:
            xenstore = start_xenstore(machine, cfg.xenstore)
        if on_built is not None:
            on_built(machine)
        budget.mark("services")

        def running() -> None:
            budget.mark("vCPUs started")
            budget.report()
            if saved is not None and saved.resume:
                machine.resume()
            daemon.report(None)         # after the resume: whoever waits may find it running
            if on_running is not None:
                on_running()
            start_load()
        reason = machine.run(running)
        log.info("VM %s stopped: %s (exit %d)", cfg.name, reason.reason, reason.exit_code)
        if machine.migration is not None and machine.migration.incoming_error:
            print_error(VMM_PROG, machine.migration.incoming_error)
        return reason.exit_code
    finally:
        if xenstore is not None:
            xenstore.close()
        if qmp is not None:
            qmp.close()             # after the SHUTDOWN event has been queued for every client
        if machine is not None:
            if machine.migration is not None:
                machine.migration.close()
            if machine.forker is not None:
                machine.forker.close()
            machine.close()


def run_forked(cfg: VmConfig, o: Overrides, saved: SavedVm, mem: GuestMemory, report_fd: int, *,
               sandbox: bool, serve_api: ServeApi, on_built: Callable[[Machine], None] | None = None,
               run_child: RunChild | None = None) -> int:
    """A forked VM's process (vmm/fork.py, made with ``o``): its own log, then its VM,
    reporting its start on ``report_fd``; ``on_built`` and ``run_child`` as :func:`run_vm`'s
    (what fails in ``on_built`` is reported too). The exit status."""
    altovirt.IMPORT_STARTED = time.perf_counter()      # its start-up budget counts from the fork
    root = logging.getLogger("altovirt")
    formatter = (root.handlers[0].formatter if root.handlers else None) or logging.Formatter()
    daemon = Daemon(None, report_fd)
    try:
        try:       # without a log of its own, only its warnings, on the stderr it shares
            if cfg.log_file:
                log_to(cfg.log_file, formatter, root.level)
            else:
                log_to(None, formatter if cfg.debug else WithoutTracebacks(formatter), logging.WARNING)
        except OSError as e:
            raise VmmError(f"the child's log: {cfg.log_file}: {e.strerror}") from e
        return run_vm(cfg, daemon, sandbox=sandbox, migratable=True, serve_api=serve_api, on_built=on_built,
                      saved=saved, mem=mem, run_child=run_child)
    except AltoVirtError as e:
        log.error("%s", e)
        daemon.report(str(e))
        return e.exit_status
