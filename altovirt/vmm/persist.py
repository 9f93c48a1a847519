"""The saved state of the hot-plug slots and their backends, and of a whole VM as a snapshot
holds it (see :mod:`altovirt.persist`).

Apart from :mod:`.hotplug`, as Firecracker keeps its persist modules, and imported only
when state is saved or restored: a VM that never snapshots does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..arch import PowerOnState
    from ..devices.pci.persist import RootPortState
    from ..devices.virtio.persist import PciFunctionState, TransportState
    from ..snapshot.format import Section


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


@dataclass(frozen=True)
class VmState:
    """A snapshot's state, read and checked, not yet put anywhere: plain data, what a VM is
    built from (Firecracker's snapshot/load) or takes in (-incoming, a live migration)."""

    header: dict[str, Any]
    kvm: PowerOnState
    hotplug: HotplugState
    # virtio-mmio.0, .1, ... or virtio-pci.0, .1, ...
    transports: tuple[TransportState, ...] | tuple[PciFunctionState, ...]
    board: dict[str, Any]                       # the board's own devices' states, by section name
    xenstore: Section | None                    # in its own envelope (xenstore/snapshot.py)
    root_ports: tuple[RootPortState, ...] = ()  # pcie-root-port.0, .1, ... (by place on bus 0)
