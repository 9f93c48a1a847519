"""One error root: every error AltoVirt defines derives from AltoVirtError and carries the exit
status the process ends with; errors raised while handling another keep it as their cause."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

from altovirt.backends import BackendError
from altovirt.backends.tap import Tap
from altovirt.config import ConfigError
from altovirt.errors import EXIT_ERROR, EXIT_USAGE, AltoVirtError
from altovirt.jailer import import_everything

from .conftest import needs_kvm, run_altovirt


def altovirt_exceptions() -> list[type[BaseException]]:
    import_everything()                 # what the jailer loads before it enters the jail
    return [obj for name, module in list(sys.modules.items()) if name.startswith("altovirt.")
            for _, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, BaseException) and obj.__module__ == name]


def test_every_error_derives_from_the_root() -> None:
    errors = altovirt_exceptions()
    assert len(errors) >= 20
    assert [e.__name__ for e in errors if not issubclass(e, AltoVirtError)] == []


def test_exit_statuses() -> None:
    assert ConfigError("x").exit_status == EXIT_USAGE
    assert BackendError(2, "x").exit_status == EXIT_ERROR
    assert AltoVirtError("x", exit_status=EXIT_USAGE).exit_status == EXIT_USAGE


def test_the_cause_is_kept() -> None:
    with pytest.raises(BackendError) as info:
        Tap("avt-nosuch0")
    assert isinstance(info.value, OSError)                  # still an OSError for its callers
    assert isinstance(info.value.__cause__, OSError)
    assert str(info.value) == "[Errno 19] tap avt-nosuch0 does not exist; create it first " \
                              "(ip tuntap add dev avt-nosuch0 mode tap)"


@needs_kvm
def test_debug_shows_the_chain_and_keeps_the_status(tmp_path: Path) -> None:
    """A runtime error is one line and exit 1; with -debug the traceback and its cause come too."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    plain = run_altovirt("-kernel", str(empty))
    line = f"altovirt: error: -kernel: {empty}: kernel image is empty\n"
    assert (plain.returncode, plain.stderr) == (1, line)
    debug = run_altovirt("-kernel", str(empty), "-debug")
    assert debug.returncode == 1
    assert "KernelError: kernel image is empty" in debug.stderr
    assert "The above exception was the direct cause of the following exception" in debug.stderr
    assert debug.stderr.endswith(line)
