"""Hot-plug on a PCI machine: PCIe root ports whose slots take a disk or a NIC, at start or
by QMP's ``device_add`` (QEMU's and StratoVirt 2.x's ``bus=PORT``), and give it up when the
guest has let go of it after ``device_del``.

Plugging is at once: the port tells the guest (presence detect), whose pciehp driver finds
the device. Unplugging is the guest's: ``device_del`` presses the slot's attention button,
and the device leaves when the guest turns the slot off (on a vCPU thread, in its
configuration write), which DEVICE_DELETED announces. The configuration follows, so a
snapshot's names the devices in the ports as they are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import VmConfig
from ..config.model import DriveConfig, NetConfig
from ..devices.virtio.block import Block
from ..devices.virtio.net import Net
from .backend_nodes import HotplugError

if TYPE_CHECKING:
    from ..devices.pci.root import PciFunction, PciRoot
    from ..devices.pci.root_port import RootPort
    from ..devices.virtio.device import Device, VirtioDevice
    from ..devices.virtio.pci import PciTransport
    from ..devices.virtio.transport import VirtioTransport

log = logging.getLogger(__name__)

# How long a pending unplug refuses another device_del: Linux's pciehp waits 5 s after the
# button for a second press, which would cancel it (QEMU refuses as long).
UNPLUG_PENDING = 5.0


class PciSlots:
    """The root ports of one PCI machine, by id, and the devices in them. ``new_function``
    makes a device a function behind the port at a devfn, with what closes its vectors and
    INTx line; ``transports`` is the VM's list, which a
    plugged device joins and an unplugged one leaves; ``on_deleted(id)`` announces an
    unplug (QMP's DEVICE_DELETED)."""

    def __init__(self, cfg: VmConfig, root: PciRoot,
                 new_function: Callable[[VirtioDevice, int], tuple[PciTransport, Callable[[], None]]],
                 transports: list[VirtioTransport], on_deleted: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.root = root
        self.ports: dict[str, RootPort] = {}
        self._new_function = new_function
        self._transports = transports
        self._on_deleted = on_deleted
        self._closers: dict[str, Callable[[], None]] = {}   # device id -> what closes its interrupts
        self._pending: dict[str, float] = {}                # device id -> when device_del pressed
        self._lock = threading.Lock()

    def in_order(self) -> list[RootPort]:
        """The ports by their places on bus 0: the order of their snapshot sections."""
        return sorted(self.ports.values(), key=self.root.location)

    def devices(self) -> dict[str, Device]:
        """The devices in the ports, by id."""
        return {f.name: f.device for p in self.ports.values() for f in _transports(p)}

    def on_bus0(self) -> set[str]:
        """The ids of the devices on bus 0, which stay (QEMU's pcie.0 takes no hot-plug)."""
        return {f.name for f in self.root.functions.values()}

    def plug(self, port_id: str, device: Block | Net, *, hot: bool = True) -> None:
        """Put ``device`` into root port ``port_id``'s slot (``hot``: the guest runs and is
        told). HotplugError, nothing changed, if there is no such port or it is taken."""
        port = self.ports.get(port_id)
        if port is None:
            accepted = ", ".join(self.ports) or "none: add -device pcie-root-port,id=ID"
            raise HotplugError(f"Bus '{port_id}' not found; root ports: {accepted}")
        with self._lock:
            if port.occupied:
                raise HotplugError(f"Bus '{port_id}': its slot holds {port.children[0].name!r}")
            transport, close = self._new_function(device, self.root.location(port)[0])
            self._closers[device.name] = close
            self.root.plug(port, transport, port.window)
            self._transports.append(transport)
            self._transports.sort(key=self.root.location)
            port.plugged(hot=hot)
            if hot:
                self._remember(port_id, device)
        log.info("%s: plugged into root port %s", device.name, port_id)

    def request_unplug(self, name: str) -> None:
        """Press the attention button of the slot holding device ``name``. HotplugError if
        no port holds it, or an unplug of it is pending."""
        port = next((p for p in self.ports.values() if any(f.name == name for f in _transports(p))), None)
        if port is None:
            raise HotplugError(f"Device {name!r} not found in a root port")
        with self._lock:
            if time.monotonic() - self._pending.get(name, -UNPLUG_PENDING) < UNPLUG_PENDING:
                raise HotplugError(f"Device {name} is already in the process of unplug")
            self._pending[name] = time.monotonic()
            port.request_unplug()
        log.info("%s: unplug requested (root port %s's attention button)", name, port.name)

    def powered_off(self, function: PciFunction) -> None:
        """The guest turned off the slot that held ``function`` (a vCPU thread): the device
        leaves the VM, its backend stays, and DEVICE_DELETED says so."""
        transport: PciTransport = function  # type: ignore[assignment]
        name = transport.device.name
        with self._lock:
            self.root.unplugged(transport)
            self._transports.remove(transport)
            transport.unplug()
            self._closers.pop(name)()
            self._pending.pop(name, None)
            self._forget(name)
        log.info("%s: unplugged (its slot powered off)", name)
        self._on_deleted(name)

    def close(self) -> None:
        """Close the plugged functions' interrupts (once their transports are closed)."""
        for close in self._closers.values():
            close()
        self._closers.clear()

    # --- the configuration, which snapshots keep ---
    def _remember(self, port_id: str, device: Block | Net) -> None:
        self.cfg.root_ports[port_id].device = device.name
        if isinstance(device, Block):
            assert device.image is not None
            image = device.image
            self.cfg.drives.append(DriveConfig(device.name, image.path, image.read_only, image.direct,
                                               device.serial.decode() or None))
        else:
            assert device.tap is not None
            self.cfg.nets.append(NetConfig(device.name, device.tap.name, device.mac))

    def _forget(self, name: str) -> None:
        for port in self.cfg.root_ports.values():
            if port.device == name:
                port.device = None
        self.cfg.drives[:] = [d for d in self.cfg.drives if d.id != name]
        self.cfg.nets[:] = [n for n in self.cfg.nets if n.id != name]


def _transports(port: RootPort) -> list[PciTransport]:
    return list(port.children.values())  # type: ignore[arg-type]
