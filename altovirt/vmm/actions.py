"""The one way from the APIs to the VMM (Firecracker's VmmAction).

An API thread (QMP, the REST API) parses and validates a request, then hands
the VMM one typed action with :meth:`Machine.request <altovirt.vmm.machine.Machine.request>`;
the VMM's main thread carries it out and the answer (or the error) goes back
to the thread that asked. API threads thus hold no VMM lock and call no VMM
method: hot-plug, a disk's new image and a migration's start are actions too,
and the migration thread asks for the stop, the state and the load the same way.
Their seccomp role allows no KVM ioctl.

The actions are NamedTuples, not dataclasses: two dozen frozen dataclasses cost some 13 ms to
define (each execs its methods' source), which every VM that serves an API would pay at start.
The queue that carries them to the main thread is :mod:`.action_queue`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .lifecycle import RunState

if TYPE_CHECKING:
    import socket

    from ..config.model import IncomingConfig, MigrationUri, RateLimiterConfig
    from .fork import Overrides
    from .persist import VmState


# --- the lifecycle (QMP stop, cont, system_reset, system_powerdown; PATCH /vm; SendCtrlAltDel) ---
class Pause(NamedTuple):
    pass


class Resume(NamedTuple):
    pass


class Reset(NamedTuple):
    pass


class Powerdown(NamedTuple):
    pass


class CtrlAltDel(NamedTuple):
    pass


class QueryVcpus(NamedTuple):
    """Per vCPU: index, thread id and whether it is halted (a list of VcpuInfo)."""


# --- hot-plug (QMP blockdev-add ... device_del; PATCH /drives) ---
class AddBlockdev(NamedTuple):
    node: str
    path: str
    read_only: bool
    direct: bool


class DelBlockdev(NamedTuple):
    node: str


class AddNetdev(NamedTuple):
    """A tap by name (``ifname``), or one the client opened (``fd``, the VMM's once taken)."""

    name: str
    ifname: str | None = None
    fd: int | None = None


class DelNetdev(NamedTuple):
    name: str


class AddDisk(NamedTuple):
    """Block node ``name`` into a disk slot (the first free one if ``slot`` is None), or into
    root port ``bus`` on a PCI machine; the slot."""

    name: str
    slot: int | None
    serial: str | None = None
    bus: str | None = None


class AddNic(NamedTuple):
    """Netdev ``name`` into a NIC slot (the first free one if ``slot`` is None), or into root
    port ``bus`` on a PCI machine; the slot."""

    name: str
    slot: int | None
    mac: str | None = None
    bus: str | None = None


class DelDevice(NamedTuple):
    name: str


class ChangeImage(NamedTuple):
    """Back disk ``drive`` by the image at ``path`` from now on (Firecracker's PATCH /drives)."""

    drive: str
    path: str


class SetRateLimiter(NamedTuple):
    """Give device ``device``'s rate limiter ``limiter`` new settings (Firecracker's PATCH of
    a drive or NIC): ``limiter`` names it, "rate_limiter" (a disk's, the entropy device's),
    "rx_rate_limiter" or "tx_rate_limiter" (a NIC's)."""

    device: str
    limiter: str
    settings: RateLimiterConfig


class PutMetadata(NamedTuple):
    """Replace the metadata service's document (Firecracker's PUT /mmds), or merge ``patch``
    into it (PATCH /mmds, RFC 7396). StoreError (mmds/store.py) if it may not."""

    data: object
    patch: bool = False


class QueryMetadata(NamedTuple):
    """The metadata service's document (GET /mmds)."""


class SetBalloon(NamedTuple):
    """Ask the guest for a balloon of ``pages`` 4 KiB pages (PATCH /balloon, QMP balloon)."""

    pages: int


class SetBalloonStats(NamedTuple):
    """Poll the balloon's statistics every ``seconds`` (PATCH /balloon/statistics)."""

    seconds: int


class FreePageHinting(NamedTuple):
    """The balloon's free page hinting: ``command`` "start" (``acknowledge_on_stop``: the
    guest's STOP ends the run), "stop", or "status" (PATCH /balloon/hinting/..., GET .../status)."""

    command: str
    acknowledge_on_stop: bool = True


class QueryCounters(NamedTuple):
    """The devices' counters since the last query, by Firecracker's metrics groups, and the
    vCPUs' exits since the start (FlushMetrics)."""


class QueryBalloon(NamedTuple):
    """The balloon: its settings, target and actual pages, and the guest's last statistics."""


# --- migration (QMP migrate ...; Firecracker's snapshot/create) ---
class Migrate(NamedTuple):
    """Start sending the VM to ``uri``; ``on_done`` hears when it has ended, either way."""

    uri: MigrationUri
    on_done: Callable[[], None] | None = None


class Incoming(NamedTuple):
    """Start loading the VM (it waits in inmigrate) from ``config.uri``."""

    config: IncomingConfig


class CancelMigration(NamedTuple):
    pass


class SetMigrationParameters(NamedTuple):
    max_bandwidth: int | None
    downtime_limit: int | None


class QueryMigration(NamedTuple):
    """query-migrate's answer."""


class QueryMigrationParameters(NamedTuple):
    """query-migrate-parameters' answer."""


class ForkVm(NamedTuple):
    """vm-fork: copy the running VM into a new process with ``overrides``; the pipe its VM
    reports its start on (vmm/fork.py)."""

    overrides: Overrides


# --- what the migration thread asks of the VM (vmm/migration.py) ---
class SaveState(NamedTuple):
    """The stopped VM's header and sections."""


class StopForMigration(NamedTuple):
    """Stop the guest for the last copy (finish-migrate); the state to go back to."""


class EndMigration(NamedTuple):
    completed: bool
    was: RunState


class LoadState(NamedTuple):
    state: VmState
    resume: bool
    new_generation: bool


Action = (Pause | Resume | Reset | Powerdown | CtrlAltDel | QueryVcpus | AddBlockdev | DelBlockdev
          | AddNetdev | DelNetdev | AddDisk | AddNic | DelDevice | ChangeImage | SetRateLimiter
          | PutMetadata | QueryMetadata | SetBalloon | SetBalloonStats | QueryBalloon | FreePageHinting
          | QueryCounters | Migrate | Incoming | CancelMigration | SetMigrationParameters | QueryMigration
          | QueryMigrationParameters | SaveState | StopForMigration | EndMigration | LoadState | ForkVm)


class Migrations(Protocol):
    """The VM's migration service (vmm/migration.py), for a VM that can migrate: what the
    requests ask of it (controller.py) and what the front ends hear from it."""

    incoming_error: str | None

    def start(self) -> None: ...
    def close(self) -> None: ...
    def migrate(self, uri: MigrationUri, on_done: Callable[[], None] | None = None) -> None: ...
    def incoming(self, incoming: IncomingConfig, listener: socket.socket | None = None) -> None: ...
    def cancel(self) -> None: ...
    def set_parameters(self, max_bandwidth: int | None, downtime_limit: int | None) -> None: ...
    def parameters(self) -> dict[str, int]: ...
    def info(self) -> dict[str, Any]: ...
