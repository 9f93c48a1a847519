"""The named backends hot-plug puts devices on, as in QEMU: block nodes (``blockdev-add``)
and netdevs (``netdev_add``). Each stays open until it is deleted, whether a device uses it
or not. Used by :class:`.hotplug.Hotplug`, under its lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..backends import BackendError
from ..backends.blockfile import BlockFile
from ..backends.tap import Tap
from ..errors import AltoVirtError

if TYPE_CHECKING:
    from .persist import BlockNodeState, NetdevState

log = logging.getLogger(__name__)


class HotplugError(AltoVirtError, ValueError):
    """A hot-plug request refused, with nothing changed."""


class Backends:
    """A VM's block nodes and netdevs, by name. ``boot_disk`` names the node of the boot
    disk, for messages."""

    def __init__(self, blockdevs: dict[str, BlockFile], netdevs: dict[str, Tap],
                 boot_disk: str | None) -> None:
        self.blockdevs = blockdevs
        self.netdevs = netdevs
        self._boot_disk = boot_disk

    def add_blockdev(self, node: str, path: str, *, read_only: bool, direct: bool) -> None:
        if node in self.blockdevs:
            raise HotplugError(f"node-name {node!r} is already in use")
        try:
            st = os.stat(path)
        except OSError as e:
            raise HotplugError(f"{path}: {e.strerror}") from e
        for name, image in self.blockdevs.items():
            other = os.fstat(image.fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                boot = " (the boot disk)" if name == self._boot_disk else ""
                raise HotplugError(f"{path} is already open as node {name!r}{boot}")
        try:
            self.blockdevs[node] = BlockFile(path, read_only=read_only, direct=direct)
        except BackendError as e:
            raise HotplugError(e.strerror or str(e)) from e
        log.info("block node %s: %s%s", node, path, " (read-only)" if read_only else "")

    def add_netdev(self, name: str, open_tap: Callable[[], Tap]) -> None:
        if name in self.netdevs:
            raise HotplugError(f"Duplicate ID {name!r} for netdev")
        try:
            self.netdevs[name] = open_tap()
        except BackendError as e:
            raise HotplugError(e.strerror or str(e)) from e
        log.info("netdev %s: tap %s", name, self.netdevs[name].name)

    def open_saved(self, nodes: dict[str, BlockNodeState], taps: dict[str, NetdevState]
                   ) -> tuple[dict[str, BlockFile], dict[str, Tap]]:
        """The saved backends: one open here under the same name is kept (the VM's own
        configuration names its disks' images and NICs' taps: clones of one snapshot each
        give their own), the others are opened as saved. SavedStateError, nothing opened
        left open, if one cannot be."""
        from ..persist import SavedStateError
        blockdevs: dict[str, BlockFile] = {}
        netdevs: dict[str, Tap] = {}
        opened: list[BlockFile | Tap] = []
        try:
            for name, b in nodes.items():
                image = self.blockdevs.get(name)
                if image is None:       # its lock is taken once the source has let go (take_images)
                    image = BlockFile(b.path, read_only=b.read_only, direct=b.direct, lock=False)
                    opened.append(image)
                blockdevs[name] = image
            for name, n in taps.items():
                tap = self.netdevs.get(name)
                if tap is None:
                    tap = Tap(n.ifname)
                    opened.append(tap)
                netdevs[name] = tap
        except BackendError as e:
            for backend in opened:
                backend.close()
            raise SavedStateError(f"a saved backend cannot be opened: {e.strerror or e}") from e
        return blockdevs, netdevs

    def replace(self, blockdevs: dict[str, BlockFile], netdevs: dict[str, Tap]) -> None:
        """Have these backends from now on; those of ours not among them are closed."""
        for name, image in self.blockdevs.items():
            if blockdevs.get(name) is not image:
                image.close()
        for name, tap in self.netdevs.items():
            if netdevs.get(name) is not tap:
                tap.close()
        self.blockdevs, self.netdevs = blockdevs, netdevs

    # --- a live migration's hand-over of the images ---
    def release_images(self) -> None:
        """Let the destination lock the images (the guest has stopped for good, here)."""
        for image in self.blockdevs.values():
            image.release_locks()

    def take_images(self) -> None:
        """Lock every image not locked yet; HotplugError naming the first one another
        process still holds (those taken stay taken)."""
        for name, image in self.blockdevs.items():
            if not image.locked:
                try:
                    image.take_locks()
                except BackendError as e:
                    raise HotplugError(f"block node {name!r}: {e.strerror}") from e

    def close(self) -> None:
        """Close every backend (after the devices, which may have closed some already)."""
        for image in self.blockdevs.values():
            image.close()
        for tap in self.netdevs.values():
            tap.close()
        self.blockdevs.clear()
        self.netdevs.clear()
