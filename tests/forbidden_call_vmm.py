"""AltoVirt with one QMP command more, ``x-test-forbidden-syscall``, whose handler calls
chroot(2), which no seccomp allow-list has: tests/test_seccomp.py proves the filter bites.
Run as ``python tests/forbidden_call_vmm.py ALTOVIRT-ARGS...``; the product has no such command."""

from __future__ import annotations

import os
from typing import Any

from altovirt import cli
from altovirt.api import commands
from altovirt.api.qmp import Command
from altovirt.vmm.machine import Machine

_build = commands.build


def build_with_forbidden_call(machine: Machine, fds: dict[str, int]) -> dict[str, Command]:
    table = _build(machine, fds)
    table["x-test-forbidden-syscall"] = Command(forbidden_call)
    return table


def forbidden_call(args: dict[str, Any]) -> object:
    os.chroot("/")
    return {}


if __name__ == "__main__":
    commands.build = build_with_forbidden_call
    cli.run()
