"""``altovirt-firecracker``: AltoVirt with Firecracker's command line and REST API.

A tool that runs ``firecracker --api-sock PATH`` (or ``--config-file FILE``
with or without ``--no-api``) and then drives the API socket runs this the
same way. The guest's serial console is the process's standard output, as in
Firecracker; ``--qmp PATH`` serves QMP for the same VM besides (hot-plug, the
XenStore's commands, migration).

Start-up: this module reads the flags and opens the API socket before any of
the VMM is imported, so a tool waiting for the socket connects at once; its
requests are answered once :mod:`.firecracker_process` has imported the VMM
and turned the sandbox on (the VM itself is built at ``InstanceStart``). So
this module imports nothing beyond what the interpreter has loaded already,
and parses the flags by hand, as Firecracker's own parser does. The checked
flags (:class:`Options`) go down to :func:`.firecracker_process.serve`, which
needs nothing of this module; what ends the process is said here.

Exit status: the VM's (0 when the guest powers off or reboots, see
``altovirt.cli``), 2 for a usage error, 128+N after signal N before any start.
"""

from __future__ import annotations

import os
import sys

from . import FIRECRACKER_API_VERSION, __version__
from .errors import EXIT_ERROR, AltoVirtError, UsageError, exit_now, print_error

TYPE_CHECKING = False               # typing's, without importing typing
if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence
    from typing import NoReturn

PROG = "altovirt-firecracker"
# flag -> (the value's name, or None for a switch; help)
FLAGS: dict[str, tuple[str | None, str]] = {
    "--api-sock": ("PATH", "the API's unix socket (default /run/firecracker.socket)"),
    "--id": ("ID", "the microVM's id: letters, digits and '-', at most 64 (default anonymous-instance)"),
    "--config-file": ("FILE", "Firecracker's JSON configuration: the VM boots at once"),
    "--no-api": (None, "no API socket (needs --config-file)"),
    "--log-path": ("PATH", "a file or named pipe for the log"),
    "--level": ("LEVEL", "Error, Warning, Info (the default), Debug, Trace or Off"),
    "--module": ("MODULE", "accepted; AltoVirt logs every module"),
    "--show-level": (None, "put the level in log lines"),
    "--show-log-origin": (None, "put the file and line in log lines"),
    "--metrics-path": ("PATH", "a file or named pipe for the metrics"),
    "--boot-timer": (None, "log the guest's boot-timer writes as time since InstanceStart"),
    "--no-seccomp": (None, "run without seccomp filters (not recommended)"),
    "--http-api-max-payload-size": ("BYTES", "the largest request body (default 51200)"),
    "--metadata": ("FILE", "a JSON document for MMDS to hold from the start"),
    "--mmds-size-limit": ("BYTES", "the MMDS document's largest size (default: the largest request body)"),
    "--start-time-us": ("US", "accepted (the jailer's timing hint)"),
    "--start-time-cpu-us": ("US", "accepted (the jailer's timing hint)"),
    "--parent-cpu-time-us": ("US", "accepted (the jailer's timing hint)"),
    "--enable-pci": (None, "put the virtio devices on a PCIe host bridge"),
    "--qmp": ("PATH", "serve QMP on this unix socket too (AltoVirt's)"),
    "--xenstore": ("PATH", "serve the VM's XenStore here too (AltoVirt's; MMDS's document is in it)"),
    "--version": (None, "print the version and exit"),
    "--help": (None, "print this help and exit"),
}
# Firecracker's flags for what AltoVirt does not have: refused, saying so.
UNSUPPORTED_FLAGS = {"--seccomp-filter": "custom seccomp filters (AltoVirt's are built in; see --no-seccomp)",
                     "--describe-snapshot": "Firecracker's snapshot format (AltoVirt writes its own)",
                     "--snapshot-version": "Firecracker's snapshot format (AltoVirt writes its own)"}
DEFAULT_API_SOCK = "/run/firecracker.socket"
BACKLOG = 32                        # connections waiting while the VMM is imported (api.http's limit)


class Options:
    """The flags, checked: what :func:`.firecracker_process.serve` takes (its ``Flags``).
    (A plain class: this module imports nothing that start-up can spare.)"""

    def __init__(self, values: dict[str, str | None]) -> None:
        self.api_sock = None if "--no-api" in values else values.get("--api-sock") or DEFAULT_API_SOCK
        self.instance_id = values.get("--id") or "anonymous-instance"
        self.config_file = values.get("--config-file")
        self.log_path = values.get("--log-path")
        self.level = values.get("--level") or "Info"
        self.show_level = "--show-level" in values
        self.show_log_origin = "--show-log-origin" in values
        self.metrics_path = values.get("--metrics-path")
        self.boot_timer = "--boot-timer" in values
        self.seccomp = "--no-seccomp" not in values
        self.max_payload = _count("--http-api-max-payload-size",
                                  values.get("--http-api-max-payload-size") or "51200")
        self.metadata = values.get("--metadata")
        self.mmds_size_limit = _count("--mmds-size-limit", values.get("--mmds-size-limit")
                                      or str(self.max_payload))
        self.enable_pci = "--enable-pci" in values
        self.qmp = values.get("--qmp")
        self.xenstore = values.get("--xenstore")
        self.version = "--version" in values
        self.help = "--help" in values


def _count(flag: str, text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise UsageError(f"{flag}: {text!r} is not a positive number")
    return int(text)


def parse(argv: Sequence[str]) -> Options:
    """Firecracker's flags (``--flag value`` or ``--flag=value``); UsageError for the first
    thing wrong."""
    values: dict[str, str | None] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, inline = arg.partition("=")
        if flag in UNSUPPORTED_FLAGS:
            raise UsageError(f"{flag}: AltoVirt does not support {UNSUPPORTED_FLAGS[flag]}")
        if flag not in FLAGS:
            raise UsageError(f"unknown argument {arg!r}; run with --help for the flags")
        if flag in values:
            raise UsageError(f"{flag} is given twice")
        metavar = FLAGS[flag][0]
        if metavar is None:
            if eq:
                raise UsageError(f"{flag} takes no value")
            values[flag] = None
        elif eq:
            values[flag] = inline
        elif not args or args[0].startswith("--"):
            raise UsageError(f"{flag} needs a value ({metavar})")
        else:
            values[flag] = args.pop(0)
    opts = Options(values)
    if "--no-api" in values and not opts.config_file:
        raise UsageError("--no-api needs --config-file (nothing could start the VM otherwise)")
    ident = opts.instance_id
    if not 0 < len(ident) <= 64 or not ident.isascii() or not ident.replace("-", "").isalnum():
        raise UsageError(f"--id: {ident!r} may hold only letters, digits and '-' (1 to 64 of them)")
    return opts


def usage() -> str:
    lines = [f"usage: {PROG} [--api-sock PATH | --no-api --config-file FILE] [flags]",
             "AltoVirt, driven like Firecracker: its flags and its REST API.", ""]
    for flag, (metavar, text) in FLAGS.items():
        lines.append(f"  {flag + (' ' + metavar if metavar else ''):34} {text}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Read the flags, open the API socket, then import the VMM and serve; the exit status.
    Whatever stops the process is said here, in one line."""
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
        if opts.help:
            sys.stdout.write(usage())
            return 0
        if opts.version:
            sys.stdout.write(f"Firecracker v{FIRECRACKER_API_VERSION} (AltoVirt {__version__}, "
                             "its API and flags)\n\n")
            return 0
        sock = _listen(opts.api_sock) if opts.api_sock is not None else None
        from .firecracker_process import serve  # the VMM: only once a client can connect
        return serve(opts, sock)
    except AltoVirtError as e:
        print_error(PROG, str(e))
        return e.exit_status
    except Exception as e:                  # a bug; serve has logged its traceback
        print_error(PROG, f"internal error: {e}")
        return EXIT_ERROR


def _listen(path: str) -> socket.socket:
    """The API socket, listening; UsageError if it cannot be."""
    from .backends.listen import listen_unix
    try:
        return listen_unix(path, BACKLOG)
    except OSError as e:
        if os.path.lexists(path):
            raise UsageError(f"--api-sock: {path} already exists; it must not exist before start") from e
        raise UsageError(f"--api-sock: {path}: {e.strerror}") from e


def run() -> NoReturn:
    """The console-script entry point (see errors.exit_now)."""
    exit_now(main())


if __name__ == "__main__":
    run()
