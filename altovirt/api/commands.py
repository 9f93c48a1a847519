"""QMP commands, mapped onto the VMM's lifecycle and queries.

Replies follow QEMU's and StratoVirt's shapes exactly (see the spec's
QMP section); a command that makes no sense in the VM's current state gets
a GenericError and changes nothing.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..vmm.machine import Machine, StateError
from ..vmm.vcpu import StopReason
from .qmp import Command, QmpError

HOST_QMP_QUIT = StopReason("host-qmp-quit", False, 0)


def version() -> dict[str, Any]:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"altovirt-{__version__}"}


def _lifecycle(action: Any) -> Any:
    def run(args: dict[str, Any]) -> object:
        try:
            action()
        except StateError as e:
            raise QmpError("GenericError", str(e)) from None
        return {}
    return run


def build(machine: Machine) -> dict[str, Command]:
    """The command table for ``machine``."""

    def query_status(args: dict[str, Any]) -> object:
        state = machine.state
        return {"running": state == "running", "singlestep": False, "status": state}

    def props(i: int) -> dict[str, int]:
        return {"core-id": i, "socket-id": 0, "thread-id": 0}

    def query_cpus(args: dict[str, Any]) -> object:
        return [{"CPU": c.index, "arch": "x86", "current": c.index == 0, "halted": c.halted,
                 "props": props(c.index), "qom_path": f"/machine/unattached/device[{c.index}]",
                 "thread_id": c.thread_id} for c in machine.vcpu_info()]

    def query_cpus_fast(args: dict[str, Any]) -> object:
        return [{"cpu-index": v.index, "props": props(v.index),
                 "qom-path": f"/machine/unattached/device[{v.index}]", "thread-id": v.thread_id,
                 "target": "x86_64"} for v in machine.vcpus]

    def query_hotpluggable_cpus(args: dict[str, Any]) -> object:
        return [{"props": props(v.index), "qom-path": f"/machine/unattached/device[{v.index}]",
                 "type": "host-x86-cpu", "vcpus-count": 1} for v in machine.vcpus]

    def quit_(args: dict[str, Any]) -> object:
        machine.request_stop(HOST_QMP_QUIT)      # SHUTDOWN goes out before this reply
        return {}

    table: dict[str, Command] = {
        "qmp_capabilities": Command(lambda a: {}, {"enable": (list, False)}),
        "stop": Command(_lifecycle(machine.pause)),
        "cont": Command(_lifecycle(machine.resume)),
        "quit": Command(quit_),
        "system_powerdown": Command(_lifecycle(machine.powerdown)),
        "query-status": Command(query_status),
        "query-cpus": Command(query_cpus),
        "query-cpus-fast": Command(query_cpus_fast),
        "query-hotpluggable-cpus": Command(query_hotpluggable_cpus),
        "query-version": Command(lambda a: version()),
        "query-name": Command(lambda a: {"name": machine.cfg.name}),
    }
    table["query-commands"] = Command(lambda a: [{"name": n} for n in sorted(table)])
    return table
