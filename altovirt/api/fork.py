"""QMP's vm-fork (AltoVirt's own command): copy the running VM into a new VMM process.

Arguments: the child's QMP socket, and what it cannot share with the parent::

    {"execute": "vm-fork", "arguments": {
        "api-channel": "/run/child.qmp",                     # the child's QMP socket
        "drives": [{"id": "disk0", "file": "/images/child.img"}],
        "netdevs": [{"id": "net0", "ifname": "tap7"}],
        "console": "/run/child.console", "vsock": "/run/child.vsock", "xenstore": "/run/child.xs",
        "serial-fd": "con",         # getfd's: the child's stdin and stdout (-serial stdio)
        "log": "/run/child.log"}}

The reply, once the child's VM runs: ``{"pid": N}``, its VMM's process (nobody's
child: ``quit`` on its QMP, or a signal, ends it). The other arguments are optional but
where the VM has a device of that kind. The parent's guest is stopped
only while its state is read and the process forks (vmm/fork.py).
"""

from __future__ import annotations

import os
from typing import Any, cast

from ..config import ConfigError
from ..persist import SaveError
from ..vmm.actions import ForkVm
from ..vmm.fork import ForkError, Overrides, read_report
from ..vmm.lifecycle import StateError
from ..vmm.machine import Machine
from .qmp import Command, QmpError, check_arguments

PATHS = {"api-channel": "api_channel", "console": "console", "vsock": "vsock", "log": "log_file",
         "xenstore": "xenstore"}


def _pairs(name: str, items: list[Any], value: str) -> tuple[tuple[str, str], ...]:
    """A list of {"id": ..., value: ...} objects as (id, value) pairs."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise QmpError("GenericError", f"Invalid parameter '{name}[{i}]': expected "
                                           f"{{\"id\": ID, \"{value}\": ...}}")
        check_arguments({"id": (str, True), value: (str, True)}, item, f"{name}[{i}].")
        out.append((item["id"], item[value]))
    return tuple(out)


def fork_commands(machine: Machine, fds: dict[str, int]) -> dict[str, Command]:
    """vm-fork; ``fds``: getfd's descriptors (the QMP server's), which serial-fd names."""
    def vm_fork(args: dict[str, Any]) -> object:
        stdio = args.get("serial-fd")
        if stdio is not None and stdio not in fds:
            raise QmpError("GenericError", f"File descriptor named '{stdio}' has not been found")
        overrides = Overrides(drives=_pairs("drives", args.get("drives", []), "file"),
                              nets=_pairs("netdevs", args.get("netdevs", []), "ifname"),
                              stdio=None if stdio is None else fds[stdio],
                              **{field: args[key] for key, field in PATHS.items() if key in args})
        try:
            report = cast(int, machine.request(ForkVm(overrides)))
        except (ForkError, ConfigError, StateError, SaveError) as e:
            raise QmpError("GenericError", str(e)) from e
        if stdio is not None:
            os.close(fds.pop(stdio))    # the child's now
        try:
            return {"pid": read_report(report)}
        except ForkError as e:
            raise QmpError("GenericError", str(e)) from e

    return {"vm-fork": Command(vm_fork, {"drives": (list, False), "netdevs": (list, False),
                                         "serial-fd": (str, False), **{key: (str, False) for key in PATHS}})}
