"""Hot-plug into replaceable virtio-mmio slots (StratoVirt's "hot-replace"), or on a PCI
machine into root ports (:mod:`.pci_hotplug`).

Backends come first and live on their own, as in QEMU: block nodes
(``blockdev-add``) and netdevs (``netdev_add``), named (:mod:`.backend_nodes`). A device is then put
into a free disk or NIC slot on a backend of the same name (``device_add``)
and taken out again (``device_del``); the backend stays open until it is
deleted. Configured disks and NICs are devices on backends named by their
ids, so they can be unplugged too. Every request is checked in full before
anything changes: a refused one leaves the VM as it was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ..backends import BackendError
from ..backends.blockfile import BlockFile
from ..backends.tap import Tap
from ..config.model import ConfigError
from ..config.validate import check_mac
from ..devices.virtio.block import Block, WorkerPool
from ..devices.virtio.mmio import MmioTransport
from ..devices.virtio.net import Net
from ..eventloop import EventLoop
from .backend_nodes import Backends, HotplugError
from .virtio_devices import empty_disk, empty_nic

__all__ = ["Hotplug", "HotplugError", "NoSuchDevice"]

if TYPE_CHECKING:
    from .pci_hotplug import PciSlots
    from .persist import HotplugState

log = logging.getLogger(__name__)


class NoSuchDevice(HotplugError):
    """The request names a device that is not plugged."""


class Hotplug:
    """The backends and the slots of one VM. Requests come as actions, one at a time, on the
    VMM's main thread (vmm/controller.py)."""

    def __init__(self, disks: list[MmioTransport], nics: list[MmioTransport], io: EventLoop,
                 pool: WorkerPool, quiet: Callable[[], AbstractContextManager[None]],
                 on_deleted: Callable[[str], None], pci: PciSlots | None = None) -> None:
        """``quiet()`` holds device work still while a slot changes; ``on_deleted(id)``
        announces an unplugged device (QMP's DEVICE_DELETED). ``pci``: a PCI machine's root
        ports (its virtio-mmio slot lists are empty)."""
        self.disks, self.nics = disks, nics
        self.pci = pci
        self._io = io
        self._pool = pool
        self._quiet = quiet
        self._on_deleted = on_deleted
        self._lock = threading.Lock()
        devices = [t.device for t in disks + nics] + list(pci.devices().values() if pci else ())
        images = {d.name: d.image for d in devices if isinstance(d, Block) and d.image is not None}
        taps = {n.name: n.tap for n in devices if isinstance(n, Net) and n.tap is not None}
        boot_disk = disks[0].device.name if disks and self._occupied(disks[0]) else None
        self.backends = Backends(images, taps, boot_disk)

    # --- backends ---
    def add_blockdev(self, node: str, path: str, *, read_only: bool, direct: bool) -> None:
        with self._lock:
            self.backends.add_blockdev(node, path, read_only=read_only, direct=direct)

    def del_blockdev(self, node: str) -> None:
        with self._lock:
            image = self.backends.blockdevs.get(node)
            if image is None:
                raise HotplugError(f"Failed to find node with node-name={node!r}")
            if self._slot_of(self.disks, node) is not None or node in self._in_ports():
                raise HotplugError(f"Node {node!r} is busy: device {node!r} uses it; device_del it first")
            del self.backends.blockdevs[node]
            image.close()

    def add_netdev(self, name: str, open_tap: Callable[[], Tap]) -> None:
        with self._lock:
            self.backends.add_netdev(name, open_tap)

    def del_netdev(self, name: str) -> None:
        with self._lock:
            tap = self.backends.netdevs.get(name)
            if tap is None:
                raise HotplugError(f"Failed to find netdev {name!r}")
            if self._slot_of(self.nics, name) is not None or name in self._in_ports():
                raise HotplugError(f"netdev {name!r} is busy: device {name!r} uses it; device_del it first")
            del self.backends.netdevs[name]
            tap.close()

    # --- devices ---
    def add_disk(self, name: str, slot: int | None, serial: str | None = None, bus: str | None = None) -> int:
        """Put node ``name`` into disk slot ``slot`` (the first free one if None), or into root
        port ``bus``; returns the slot (0 in a root port)."""
        with self._lock:
            image = self.backends.blockdevs.get(name)
            if image is None:
                raise HotplugError(f"no block node named {name!r}: blockdev-add it first "
                                   "(device_add's id must equal its node-name)")
            if bus is not None:
                with self._quiet():         # refused while the VM migrates, as a slot's change
                    self._port(name, bus).plug(bus, Block(name, image, self._pool, (serial or "").encode()))
                return 0
            index = self._free_slot(self.disks, name, slot, "disk")
            self._plug(self.disks[index], Block(name, image, self._pool, (serial or "").encode()))
        log.info("disk %s plugged into disk slot %d", name, index)
        return index

    def change_image(self, name: str, path: str) -> None:
        """Back disk ``name`` by the image at ``path`` from now on (read-only or not, and
        cached or not, as before); the old image is closed. The driver keeps its queues
        and learns the new size from a configuration change (virtio 1.2, 4.2.2), as with
        Firecracker's PATCH /drives."""
        with self._lock:
            index = self._slot_of(self.disks, name)
            if index is None:
                raise NoSuchDevice(f"no disk named {name!r}")
            old = _block(self.disks[index])
            assert old.image is not None
            try:
                image = BlockFile(path, read_only=old.image.read_only, direct=old.image.direct)
            except BackendError as e:
                raise HotplugError(e.strerror or str(e)) from e
            self._plug(self.disks[index], Block(name, image, self._pool, old.serial, old.rate_limiter.cfg))
            self.backends.blockdevs[name] = image
            old.image.close()
        log.info("disk %s: now backed by %s", name, path)

    def add_nic(self, name: str, slot: int | None, mac: str | None = None, bus: str | None = None) -> int:
        """Put netdev ``name`` into NIC slot ``slot`` (the first free one if None), or into root
        port ``bus``; returns the slot (0 in a root port)."""
        with self._lock:
            tap = self.backends.netdevs.get(name)
            if tap is None:
                raise HotplugError(f"no netdev named {name!r}: netdev_add it first "
                                   "(device_add's id must equal the netdev's id)")
            if bus is not None:
                with self._quiet():
                    self._port(name, bus).plug(bus, Net(name, tap, mac, self._io))
                return 0
            index = self._free_slot(self.nics, name, slot, "NIC")
            transport = self.nics[index]
            assert isinstance(transport.device, Net)
            # The guest read the MAC when it found the slot; keep it unless told otherwise.
            self._plug(transport, Net(name, tap, mac or transport.device.mac, self._io))
        log.info("NIC %s plugged into NIC slot %d", name, index)
        return index

    def del_device(self, name: str) -> None:
        with self._lock:
            if (index := self._slot_of(self.disks, name)) is not None:
                self._plug(self.disks[index], empty_disk(index, self._pool))
            elif (index := self._slot_of(self.nics, name)) is not None:
                self._plug(self.nics[index], empty_nic(index, self._io))
            elif name in self._in_ports():
                assert self.pci is not None
                with self._quiet():
                    self.pci.request_unplug(name)   # the guest lets go of it, then DEVICE_DELETED
                return
            elif self.pci is not None and name in self.pci.on_bus0():
                raise HotplugError("Bus 'pcie.0' does not support hotplugging")
            else:
                raise NoSuchDevice(f"Device {name!r} not found")
        log.info("device %s unplugged", name)
        self._on_deleted(name)

    # --- saved state (device work is held still) ---
    def save(self) -> HotplugState:
        from .persist import BlockNodeState, DiskSlotState, HotplugState, NetdevState, NicSlotState
        with self._lock:
            return HotplugState(
                tuple(BlockNodeState(n, i.path, i.read_only, i.direct)
                      for n, i in self.backends.blockdevs.items()),
                tuple(NetdevState(n, t.name) for n, t in self.backends.netdevs.items()),
                tuple(DiskSlotState(t.device.name if self._occupied(t) else "", _block(t).serial)
                      for t in self.disks),
                tuple(NicSlotState(t.device.name if self._occupied(t) else "", _net(t).mac)
                      for t in self.nics))

    def restore(self, state: HotplugState) -> None:
        """Open the saved backends and put the saved devices in their slots, keeping what is
        already so (a VM built from the same configuration has its configured devices).
        Before the guest runs, with device work still: the slots' transports are restored
        afterwards. SavedStateError, with the slots and backends unchanged, if the state does
        not fit or a backend fails."""
        from ..persist import SavedStateError, check
        nodes = {b.node: b for b in state.blockdevs}
        taps = {n.name: n for n in state.netdevs}
        check(len(nodes) == len(state.blockdevs) and len(taps) == len(state.netdevs),
              "a backend name is saved twice")
        check((len(state.disks), len(state.nics)) == (len(self.disks), len(self.nics)),
              f"{len(state.disks)} disk and {len(state.nics)} NIC slots saved; this VM has "
              f"{len(self.disks)} and {len(self.nics)}")
        plugged = [s.device for s in state.disks if s.device] + [n.device for n in state.nics if n.device]
        check(len(set(plugged)) == len(plugged), "a device is saved in two slots")
        for s in state.disks:
            check(not s.device or s.device in nodes, f"disk {s.device!r} has no saved block node")
        for i, n in enumerate(state.nics):
            check(not n.device or n.device in taps, f"NIC {n.device!r} has no saved netdev")
            try:
                check_mac(f"NIC slot {i}", n.mac)
            except ConfigError as e:
                raise SavedStateError(str(e)) from e
        with self._lock:
            blockdevs, netdevs = self.backends.open_saved(nodes, taps)
            for i, (saved, transport) in enumerate(zip(state.disks, self.disks, strict=True)):
                image = blockdevs[saved.device] if saved.device else None
                old = _block(transport)
                if (old.image, old.serial) != (image, saved.serial) or (image and old.name != saved.device):
                    transport.replace(Block(saved.device, image, self._pool, saved.serial) if image
                                      else empty_disk(i, self._pool))
            for i, (n, transport) in enumerate(zip(state.nics, self.nics, strict=True)):
                tap = netdevs[n.device] if n.device else None
                was = _net(transport)
                if (was.tap, was.mac) != (tap, n.mac) or (tap and was.name != n.device):
                    transport.replace(Net(n.device, tap, n.mac, self._io) if tap
                                      else empty_nic(i, self._io, n.mac))
            self.backends.replace(blockdevs, netdevs)

    # --- a live migration's hand-over of the images ---
    def release_images(self) -> None:
        """Let the destination lock the images (the guest has stopped for good, here)."""
        with self._lock:
            self.backends.release_images()

    def take_images(self) -> None:
        """Lock every image not locked yet; HotplugError naming the first one another
        process still holds (those taken stay taken)."""
        with self._lock:
            self.backends.take_images()

    # --- helpers ---
    def _in_ports(self) -> set[str]:
        return set() if self.pci is None else set(self.pci.devices())

    def _port(self, name: str, bus: str) -> PciSlots:
        """The root ports, for device ``name`` to go into ``bus``: HotplugError if it is not
        a PCI machine or the name is taken."""
        if self.pci is None:
            raise HotplugError(f"Bus '{bus}' not found: a virtio-mmio machine has no buses "
                               "(-machine q35 has root ports)")
        if name in self._in_ports() or name in self.pci.on_bus0():
            raise HotplugError(f"Duplicate device ID {name!r}")
        return self.pci

    def _plug(self, transport: MmioTransport, device: Block | Net) -> None:
        with self._quiet():
            transport.replace(device).unplugged()

    @staticmethod
    def _occupied(transport: MmioTransport) -> bool:
        d = transport.device
        return (isinstance(d, Block) and d.image is not None) or (isinstance(d, Net) and d.tap is not None)

    def _slot_of(self, slots: list[MmioTransport], name: str) -> int | None:
        for i, t in enumerate(slots):
            if self._occupied(t) and t.device.name == name:
                return i
        return None

    def _free_slot(self, slots: list[MmioTransport], name: str, slot: int | None, what: str) -> int:
        if self._slot_of(self.disks, name) is not None or self._slot_of(self.nics, name) is not None:
            raise HotplugError(f"Duplicate device ID {name!r}")
        if not slots:
            raise HotplugError(f"this VM has no {what} slots: on a PCI machine, give bus= a "
                               "pcie-root-port's id")
        if slot is None:
            free = [i for i, t in enumerate(slots) if not self._occupied(t)]
            if not free:
                raise HotplugError(f"all {len(slots)} {what} slots are in use")
            return free[0]
        if not 0 <= slot < len(slots):
            raise HotplugError(f"{what} slot {slot} does not exist; this VM has {what} slots "
                               f"0 to {len(slots) - 1}")
        if self._occupied(slots[slot]):
            raise HotplugError(f"{what} slot {slot} is in use by {slots[slot].device.name!r}")
        return slot

    def close(self) -> None:
        """Close every backend (after the devices, which may have closed some already)."""
        self.backends.close()


def _block(transport: MmioTransport) -> Block:
    assert isinstance(transport.device, Block)
    return transport.device


def _net(transport: MmioTransport) -> Net:
    assert isinstance(transport.device, Net)
    return transport.device
