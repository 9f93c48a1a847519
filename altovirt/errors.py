"""The root of every error AltoVirt raises on purpose.

``str(error)`` is one line for the user, naming what is wrong and what is
accepted (the programs write it with :func:`print_error`); ``exit_status`` is
what the process exits with when the error ends it (see ``altovirt.cli``).
Errors raised while handling another keep it as their cause (``raise ... from
e``), so ``-debug`` and the log show the chain.
Module errors also derive from the built-in class they refine (ValueError,
OSError...), so code that catches those keeps working.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False                   # typing's: the Firecracker front end imports this module first
if TYPE_CHECKING:
    from typing import NoReturn

EXIT_ERROR = 1          # a VMM, KVM or host error
EXIT_USAGE = 2          # a usage or configuration error
# The VMM's program name: it signs the VMM's own error lines, whichever front end runs it.
VMM_PROG = "altovirt"


def print_error(program: str, message: str) -> None:
    """Say why ``program`` stops, as the one line ``<program>: error: <message>`` on stderr
    (argparse's form), flushed at once so that it precedes whatever is written after it."""
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.stderr.flush()


def exit_now(code: int) -> NoReturn:
    """End the process with ``code``, stdout and stderr flushed, without the interpreter's
    teardown: the programs have closed the VM and every file they wrote by then, and module
    finalization costs about 9 ms per VM on these hosts, which users starting many VMs pay
    for nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class AltoVirtError(Exception):
    """An error AltoVirt reports as one line and an exit status."""

    exit_status = EXIT_ERROR

    def __init__(self, *args: object, exit_status: int | None = None) -> None:
        super().__init__(*args)
        if exit_status is not None:
            self.exit_status = exit_status


class UsageError(AltoVirtError):
    """A program's command line is wrong; the message names what, and what is accepted."""

    exit_status = EXIT_USAGE


class VmmError(AltoVirtError, RuntimeError):
    """The VM cannot be built or run; the message is one line for the user."""
