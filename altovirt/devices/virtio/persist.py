"""The saved state of virtqueues and the virtio transports (see :mod:`altovirt.persist`).

Apart from the components, as Firecracker keeps its persist modules, and imported only
when state is saved or restored: a VM that never snapshots does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueState:
    """A queue as the driver programmed it and where the device stands in its rings
    (rust-vmm virtio-queue's QueueState). ``active``: the rings are in use (DRIVER_OK)."""

    max_size: int
    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    active: bool
    event_idx: bool
    indirect: bool
    next_avail: int
    next_used: int
    signalled_used: int         # -1: no interrupt yet since activation


@dataclass(frozen=True)
class TransportState:
    """The slot's registers, its queues, and what the device took from the driver.
    ``config``: the device's configuration space, which the guest has read."""

    device_id: int
    config: bytes
    status: int
    features_sel: int
    driver_features: int
    driver_features_sel: int
    queue_sel: int
    config_generation: int
    interrupt_status: int
    broken: bool
    queues: tuple[QueueState, ...]


@dataclass(frozen=True)
class PciFunctionState:
    """A virtio-pci function: the transport's state, its configuration space as the driver
    left it (command, BARs, MSI-X control), its MSI-X table and the vectors it chose."""

    transport: TransportState
    config: bytes
    msix_table: bytes
    config_vector: int
    queue_vectors: tuple[int, ...]
