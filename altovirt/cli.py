"""The ``altovirt`` command: parse, set up the log, run the VM (:mod:`.vmm.run`), and map
the outcome to an exit status.

Exit status: 0 the guest powered off or reset (or Ctrl-A x), 1 a VMM or KVM
error, 2 a usage or configuration error, 3 a guest panic, 128+N stopped by
signal N. Errors are one line on stderr; tracebacks appear only with
-debug or in the -D log file.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import NoReturn

from .api import serve_qmp
from .config import ConfigError, HelpRequested, VmConfig, load_config
from .errors import EXIT_ERROR, VMM_PROG, AltoVirtError, exit_now, print_error
from .vmm.daemon import Daemon
from .vmm.run import Budget, WithoutTracebacks, log_to, run_vm

log = logging.getLogger("altovirt")


def setup_logging(cfg: VmConfig) -> None:
    """-D FILE: the whole log (INFO, DEBUG with -debug) in FILE, and -D alone the same on
    stderr; otherwise warnings and errors on stderr, one line each, or everything with
    times and tracebacks with -debug."""
    fmt = "%(asctime)s.%(msecs)03d %(levelname)s [%(threadName)s] %(name)s: %(message)s"
    if cfg.log_file or cfg.log_stderr:
        log_to(cfg.log_file or None, logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"),
               logging.DEBUG if cfg.debug else logging.INFO)
    elif cfg.debug:
        log_to(None, logging.Formatter(fmt, "%H:%M:%S"), logging.DEBUG)
    else:
        log_to(None, WithoutTracebacks(logging.Formatter(f"{VMM_PROG}: %(levelname)s: %(message)s")),
               logging.WARNING)


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
        print_error(VMM_PROG, str(e))
        return e.exit_status
    setup_logging(cfg)
    daemon = Daemon(cfg.pidfile)
    if cfg.daemonize:
        daemon.detach()
    budget.mark("configuration")
    try:
        return run_vm(cfg, daemon, sandbox=cfg.seccomp, migratable=bool(cfg.api_channel or cfg.incoming),
                      serve_api=serve_qmp, budget=budget)
    except AltoVirtError as e:
        report_error(cfg, daemon, e, debug)
        return e.exit_status
    except Exception as e:
        log.exception("internal error")
        daemon.report(f"internal error: {e}")
        if debug:
            raise
        print_error(VMM_PROG, f"internal error: {e} (run with -debug for a traceback)")
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
    print_error(VMM_PROG, str(e))


def run() -> NoReturn:
    """The console-script entry point (see errors.exit_now)."""
    exit_now(main())
