"""The APIs: QMP (and its commands), the XenStore's commands, Firecracker's REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vmm.machine import Machine
    from .qmp import QmpServer


def serve_qmp(machine: Machine, path: str) -> QmpServer:
    """QMP for ``machine`` on the unix socket ``path`` (see :func:`.commands.serve`), what the
    front ends hand vmm.run.run_vm; only a VM with a QMP channel imports the commands."""
    from .commands import serve
    return serve(machine, path)
