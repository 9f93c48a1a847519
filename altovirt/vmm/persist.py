"""The saved state of the hot-plug slots and their backends (see :mod:`altovirt.persist`).

Apart from :mod:`.hotplug`, as Firecracker keeps its persist modules, and imported only
when state is saved or restored: a VM that never snapshots does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockNodeState:
    """A ``blockdev-add`` node (or a configured disk's image)."""

    node: str
    path: str
    read_only: bool
    direct: bool


@dataclass(frozen=True)
class NetdevState:
    """A ``netdev_add`` tap (or a configured NIC's)."""

    name: str
    ifname: str


@dataclass(frozen=True)
class DiskSlotState:
    device: str             # "" for an empty slot
    serial: bytes


@dataclass(frozen=True)
class NicSlotState:
    device: str             # "" for an empty slot
    mac: str                # an empty slot's too: the guest has read it


@dataclass(frozen=True)
class HotplugState:
    blockdevs: tuple[BlockNodeState, ...]
    netdevs: tuple[NetdevState, ...]
    disks: tuple[DiskSlotState, ...]
    nics: tuple[NicSlotState, ...]
