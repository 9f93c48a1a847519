"""The one way from the APIs to the VMM (Firecracker's VmmAction).

An API thread (QMP, the REST API) parses and validates a request, then hands
the VMM one typed action with :meth:`Machine.request <altovirt.vmm.machine.Machine.request>`;
the VMM's main thread carries it out and the answer (or the error) goes back
to the thread that asked. API threads thus hold no VMM lock and call no VMM
method: hot-plug, a disk's new image and a migration's start are actions too,
and the migration thread asks for the stop, the state and the load the same way.
Their seccomp role allows no KVM ioctl.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..eventloop import EventLoop
from .lifecycle import RunState, StateError

if TYPE_CHECKING:
    from ..config.model import IncomingConfig, MigrationUri
    from ..snapshot.format import Section


# --- the lifecycle (QMP stop, cont, system_reset, system_powerdown; PATCH /vm; SendCtrlAltDel) ---
@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Powerdown:
    pass


@dataclass(frozen=True)
class CtrlAltDel:
    pass


@dataclass(frozen=True)
class QueryVcpus:
    """Per vCPU: index, thread id and whether it is halted (a list of VcpuInfo)."""


# --- hot-plug (QMP blockdev-add ... device_del; PATCH /drives) ---
@dataclass(frozen=True)
class AddBlockdev:
    node: str
    path: str
    read_only: bool
    direct: bool


@dataclass(frozen=True)
class DelBlockdev:
    node: str


@dataclass(frozen=True)
class AddNetdev:
    """A tap by name (``ifname``), or one the client opened (``fd``, the VMM's once taken)."""

    name: str
    ifname: str | None = None
    fd: int | None = None


@dataclass(frozen=True)
class DelNetdev:
    name: str


@dataclass(frozen=True)
class AddDisk:
    """Block node ``name`` into a disk slot (the first free one if ``slot`` is None); the slot."""

    name: str
    slot: int | None
    serial: str | None = None


@dataclass(frozen=True)
class AddNic:
    """Netdev ``name`` into a NIC slot (the first free one if ``slot`` is None); the slot."""

    name: str
    slot: int | None
    mac: str | None = None


@dataclass(frozen=True)
class DelDevice:
    name: str


@dataclass(frozen=True)
class ChangeImage:
    """Back disk ``drive`` by the image at ``path`` from now on (Firecracker's PATCH /drives)."""

    drive: str
    path: str


# --- migration (QMP migrate ...; Firecracker's snapshot/create) ---
@dataclass(frozen=True)
class Migrate:
    """Start sending the VM to ``uri``; ``on_done`` hears when it has ended, either way."""

    uri: MigrationUri
    on_done: Callable[[], None] | None = None


@dataclass(frozen=True)
class Incoming:
    """Start loading the VM (it waits in inmigrate) from ``config.uri``."""

    config: IncomingConfig


@dataclass(frozen=True)
class CancelMigration:
    pass


@dataclass(frozen=True)
class SetMigrationParameters:
    max_bandwidth: int | None
    downtime_limit: int | None


@dataclass(frozen=True)
class QueryMigration:
    """query-migrate's answer."""


@dataclass(frozen=True)
class QueryMigrationParameters:
    """query-migrate-parameters' answer."""


# --- what the migration thread asks of the VM (vmm/migration.py) ---
@dataclass(frozen=True)
class SaveState:
    """The stopped VM's header and sections."""


@dataclass(frozen=True)
class StopForMigration:
    """Stop the guest for the last copy (finish-migrate); the state to go back to."""


@dataclass(frozen=True)
class EndMigration:
    completed: bool
    was: RunState


@dataclass(frozen=True)
class LoadState:
    header: dict[str, Any]
    sections: dict[str, Section]
    resume: bool
    new_generation: bool


Action = (Pause | Resume | Reset | Powerdown | CtrlAltDel | QueryVcpus | AddBlockdev | DelBlockdev
          | AddNetdev | DelNetdev | AddDisk | AddNic | DelDevice | ChangeImage | Migrate | Incoming
          | CancelMigration | SetMigrationParameters | QueryMigration | QueryMigrationParameters
          | SaveState | StopForMigration | EndMigration | LoadState)


class Migrations(Protocol):
    """The VM's migration service (vmm/migration.py), for a VM that can migrate: what the
    requests ask of it (controller.py) and what the front ends hear from it."""

    incoming_error: str | None
    on_incoming_end: Callable[[str | None], None] | None

    def migrate(self, uri: MigrationUri, on_done: Callable[[], None] | None = None) -> None: ...
    def incoming(self, incoming: IncomingConfig) -> None: ...
    def cancel(self) -> None: ...
    def set_parameters(self, max_bandwidth: int | None, downtime_limit: int | None) -> None: ...
    def parameters(self) -> dict[str, int]: ...
    def info(self) -> dict[str, Any]: ...


class _Request:
    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class ActionQueue:
    """Requests from any thread, carried out on ``loop``'s thread in the order they came."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._closed = False

    def submit(self, work: Callable[[], object]) -> object:
        """Run ``work`` on the loop's thread; its result, or its exception raised here.
        StateError once the VMM has stopped serving requests."""
        if self._loop.in_thread():
            return work()
        request = _Request(work)
        with self._lock:
            if self._closed:
                raise StateError("the VM is shutting down")
            self._pending.append(request)
        self._loop.call_later(0, lambda: self._serve(request))
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _serve(self, request: _Request) -> None:
        with self._lock:
            if request not in self._pending:
                return
            self._pending.remove(request)
        try:
            request.result = request.work()
        except BaseException as e:      # the asking thread raises it
            request.error = e
        request.done.set()

    def close(self) -> None:
        """Refuse new requests and answer those still waiting: the VMM is stopping."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        for request in pending:
            request.error = StateError("the VM is shutting down")
            request.done.set()
