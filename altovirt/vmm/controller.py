"""Carrying out an action on the VMM's main thread (Firecracker's RuntimeApiController).

:meth:`Machine.request <altovirt.vmm.machine.Machine.request>` hands every
action here, on the main thread; what it returns is the asker's answer, what it
raises the asker's error (StateError, HotplugError, MigrationError, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, assert_never

from ..backends.tap import Tap
from ..config.model import DriveConfig, NetConfig, RateLimiterConfig, RngConfig
from ..devices.rate_limiter import RateLimiter
from . import power
from .actions import (
    Action,
    AddBlockdev,
    AddDisk,
    AddNetdev,
    AddNic,
    CancelMigration,
    ChangeImage,
    CtrlAltDel,
    DelBlockdev,
    DelDevice,
    DelNetdev,
    EndMigration,
    ForkVm,
    FreePageHinting,
    Incoming,
    LoadState,
    Migrate,
    Pause,
    Powerdown,
    PutMetadata,
    QueryBalloon,
    QueryCounters,
    QueryMetadata,
    QueryMigration,
    QueryMigrationParameters,
    QueryVcpus,
    Reset,
    Resume,
    SaveState,
    SetBalloon,
    SetBalloonStats,
    SetMigrationParameters,
    SetRateLimiter,
    StopForMigration,
)
from .hotplug import Hotplug, HotplugError
from .lifecycle import StateError
from .vcpu import EXIT_NAMES

if TYPE_CHECKING:
    from ..devices.virtio.balloon import Balloon
    from ..mmds.store import Mmds
    from .actions import Migrations
    from .machine import Machine


def handle(m: Machine, action: Action) -> object:
    """Carry out ``action`` on ``m`` (the main thread); its answer."""
    match action:
        case Pause():
            m.pause()
        case Resume():
            m.resume()
        case Reset():
            power.reset(m)
        case Powerdown():
            power.powerdown(m)
        case CtrlAltDel():
            power.ctrl_alt_del(m)
        case QueryVcpus():
            return m.vcpu_info()
        case AddBlockdev(node, path, read_only, direct):
            _hotplug(m).add_blockdev(node, path, read_only=read_only, direct=direct)
        case DelBlockdev(node):
            _hotplug(m).del_blockdev(node)
        case AddNetdev(name, ifname, fd):
            _hotplug(m).add_netdev(name, _tap_opener(ifname, fd))
        case DelNetdev(name):
            _hotplug(m).del_netdev(name)
        case AddDisk(name, slot, serial, bus):
            return _hotplug(m).add_disk(name, slot, serial, bus)
        case AddNic(name, slot, mac, bus):
            return _hotplug(m).add_nic(name, slot, mac, bus)
        case DelDevice(name):
            _hotplug(m).del_device(name)
        case ChangeImage(drive, path):
            _hotplug(m).change_image(drive, path)
            for saved in m.cfg.drives:      # the configuration a snapshot keeps names it too
                if saved.id == drive:
                    saved.path = path
        case SetRateLimiter(device, limiter, settings):
            _set_rate_limiter(m, device, limiter, settings)
        case PutMetadata(data, patch):
            store = _mmds(m)
            (store.patch if patch else store.put)(data)
        case QueryMetadata():
            return _mmds(m).value()
        case SetBalloon(pages):
            _balloon(m).set_target(pages)
        case SetBalloonStats(seconds):
            _balloon(m).set_stats_interval(seconds)
        case QueryBalloon():
            return _balloon(m).info()
        case FreePageHinting("start", acknowledge):
            _balloon(m).start_hinting(acknowledge)
        case FreePageHinting("stop"):
            _balloon(m).stop_hinting()
        case FreePageHinting():             # "status"
            return _balloon(m).hinting_status()
        case QueryCounters():
            groups: dict[str, dict[str, int]] = {k: dict(v) for k, v in m.devices.take_counters().items()}
            groups["vcpu"] = {name: sum(v.exits[i] for v in m.vcpus) for i, name in enumerate(EXIT_NAMES)}
            return groups
        case Migrate(uri, on_done):
            _migration(m).migrate(uri, on_done)
        case Incoming(config):
            _migration(m).incoming(config)
        case CancelMigration():
            _migration(m).cancel()
        case SetMigrationParameters(bandwidth, downtime):
            _migration(m).set_parameters(bandwidth, downtime)
        case QueryMigration():
            return _migration(m).info()
        case QueryMigrationParameters():
            return _migration(m).parameters()
        case SaveState():
            from . import snapshot  # only a VM that is saved imports it (start-up)
            return snapshot.save_state(m)
        case StopForMigration():
            from . import snapshot
            return snapshot.stop_for_migration(m)
        case EndMigration(completed, was):
            from . import snapshot
            snapshot.end_migration(m, completed, was)
        case LoadState(state, resume, new_generation):
            from . import snapshot
            snapshot.load_state(m, state, resume=resume, new_generation=new_generation)
        case ForkVm(overrides):
            from . import fork
            if m.forker is None:
                raise StateError("this VM cannot be forked: it has no migration support or no API channel")
            return fork.fork(m, overrides, m.forker)
        case _:
            assert_never(action)        # mypy: every action has its case
    return None


def _hotplug(m: Machine) -> Hotplug:
    if m.hotplug is None:
        raise HotplugError("this VM has no hot-plug slots")
    return m.hotplug


def _mmds(m: Machine) -> Mmds:
    if m.devices.mmds is None:
        from ..mmds.store import NotInitialized
        raise NotInitialized()
    return m.devices.mmds


def _balloon(m: Machine) -> Balloon:
    if m.devices.balloon is None:
        from ..devices.virtio.balloon import BalloonError
        raise BalloonError("No balloon device found.")
    return m.devices.balloon


def _migration(m: Machine) -> Migrations:
    if m.migration is None:
        raise StateError("this VM cannot migrate (it has no QMP channel, API or -incoming)")
    return m.migration


def _set_rate_limiter(m: Machine, name: str, which: str, settings: RateLimiterConfig) -> None:
    """The device's limiter takes the settings on the I/O thread, which its work runs on; the
    configuration a snapshot keeps takes them too."""
    device = next((t.device for t in m.devices.transports if t.device.name == name), None)
    limiter = getattr(device, which, None)
    if not isinstance(limiter, RateLimiter):
        raise HotplugError(f"no device {name!r} with a {which}")
    m.io.call_later(0, functools.partial(limiter.update, settings))
    entries: list[DriveConfig | NetConfig | RngConfig] = [*m.cfg.drives, *m.cfg.nets]
    if m.cfg.rng is not None:
        entries.append(m.cfg.rng)
    for entry in entries:
        if entry.id == name:
            setattr(entry, which, settings)


def _tap_opener(ifname: str | None, fd: int | None) -> Callable[[], Tap]:
    """What opens the tap: by name, or adopting ``fd``."""
    if ifname is not None:
        return lambda: Tap(ifname)
    assert fd is not None
    return lambda: Tap.from_fd(fd)
