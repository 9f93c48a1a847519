"""The VM's devices: the two buses, the legacy devices on port I/O, the virtio devices in
virtio-mmio slots or on a PCIe host bridge, and the interrupt and notification eventfds
that tie them to KVM.

Interrupts are irqfds (KVM_IRQFD), queue notifications ioeventfds
(KVM_IOEVENTFD with the queue index as datamatch), so neither needs a vCPU
exit to user space to reach a device. Each device describes itself to the
firmware; :meth:`DeviceManager.firmware_devices` gathers what they say.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

from .. import arch
from ..acpi.tables import BOOT_NO_MSI
from ..config import VmConfig
from ..devices.bus import Bus
from ..devices.legacy.acpi import ACPI_PORT_BASE, ACPI_PORT_COUNT, GED_IRQ, AcpiRegisters
from ..devices.legacy.boottimer import BOOT_TIMER_PORT, BootTimer
from ..devices.legacy.i8042 import DATA_PORT as I8042_PORT
from ..devices.legacy.i8042 import I8042, I8042_IRQ
from ..devices.legacy.pl011 import Pl011
from ..devices.legacy.pl031 import Pl031
from ..devices.legacy.pl061 import Pl061
from ..devices.legacy.post import POST_PORT, PostPort
from ..devices.legacy.rtc import RTC_PORT, Rtc
from ..devices.legacy.serial import COM1_IRQ, COM1_PORT, Serial
from ..devices.legacy.vmgenid import VmGenId
from ..devices.rate_limiter import TokenBucket
from ..devices.virtio.block import Block, WorkerPool
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.mmio import INTERRUPT_ACK, QUEUE_NOTIFY, MmioTransport
from ..devices.virtio.net import Net
from ..devices.virtio.transport import VirtioTransport
from ..eventloop import EventLoop
from ..kvm import Vm
from ..memory import GuestMemory
from . import virtio_devices
from .console import HostConsole
from .hotplug import Hotplug
from .vcpu import GUEST_RESET, GUEST_SHUTDOWN, StopReason

if TYPE_CHECKING:
    from ..devices.pci.root import PciRoot
    from ..devices.virtio.balloon import Balloon
    from ..devices.virtio.pci import PciTransport
    from ..devices.virtio.vsock import Vsock
    from ..mmds.store import Mmds
    from ..persist import Persistent
    from .msi import GsiRoutes
    from .pci_hotplug import PciSlots

log = logging.getLogger(__name__)

POWER_BUTTON_HOLD = 0.1          # s: QEMU's gpio-key latency (hw/gpio/gpio_key.c)
# A root port's bridge windows, 1 MiB-grained (PCI-to-PCI Bridge 1.2, 3.2.5.8): a virtio-pci
# function's BAR is 64-bit and prefetchable, and Linux places a hot-added one inside them.
PORT_MEM32, PORT_PREF64 = 1 << 20, 16 << 20


# Firecracker's metrics group of each kind of virtio device (by device ID), "{}" its name.
_METRIC_GROUPS = {1: "net_{}", 2: "block_{}", 4: "entropy", 5: "balloon", 19: "vsock"}


class DeviceManager:
    """Creates the devices of one VM on ``vm`` and ``mem``, and releases them."""

    def __init__(self, cfg: VmConfig, vm: Vm, mem: GuestMemory, io: EventLoop, pool: WorkerPool,
                 stop: Callable[[StopReason], None], emit: Callable[[str, dict[str, object]], None]) -> None:
        """``stop(reason)`` is how a device ends the VM (ACPI S5, the i8042's reset line);
        ``emit(event, data)`` how it tells the VMM's listeners (QMP's events)."""
        self.cfg, self._vm, self._mem, self._io, self._pool = cfg, vm, mem, io, pool
        self._stop = stop
        self._emit = emit
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._fds: list[int] = []
        self.transports: list[VirtioTransport] = []
        self.slots: list[virtio_devices.MmioSlot] = []
        self.pci: PciRoot | None = None
        self._routes: GsiRoutes | None = None
        self._closers: list[Callable[[], None]] = []
        self.boot_timer = BootTimer()
        self.console: HostConsole | None = None
        self.serial: Serial | None = None
        self.pl011: Pl011 | None = None
        self.pl031: Pl031 | None = None
        self.gpio: Pl061 | None = None
        self.i8042: I8042 | None = None
        self.acpi: AcpiRegisters | None = None
        self.rtc: Rtc | None = None
        self.vmgenid: VmGenId | None = None
        self.hotplug: Hotplug | None = None
        self.vsock: Vsock | None = None
        self.mmds: Mmds | None = None
        self.balloon: Balloon | None = None

    def _irqfd(self, gsi: int) -> int:
        """An eventfd that raises an edge on ``gsi`` when written (KVM_IRQFD)."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self._vm.irqfd(fd, gsi)
        return fd

    def _irq_line(self, gsi: int) -> Callable[[], None]:
        fd = self._irqfd(gsi)
        return lambda: os.eventfd_write(fd, 1)

    def add_virtio_devices(self, quiet: Callable[[], AbstractContextManager[None]],
                           on_deleted: Callable[[str], None]) -> list[virtio_devices.MmioSlot]:
        """Create the configured virtio devices, and the empty hot-plug slots when the VM
        has a QMP channel to fill them; returns the slots. ``quiet`` and ``on_deleted``
        are the hot-plug's (see :class:`Hotplug`)."""
        devices = virtio_devices.devices_for(self.cfg, self._io, self._pool,
                                             hotplug=bool(self.cfg.api_channel) and not self.cfg.pci,
                                             emit=self._emit)
        self.vsock = devices.vsock
        self.mmds = devices.mmds
        self.balloon = devices.balloon
        if self.cfg.pci:
            slots = self._add_pci_devices(devices.in_slot_order(), on_deleted)
            self.hotplug = Hotplug([], [], self._io, self._pool, quiet, on_deleted, slots)
            return self.slots
        for index, device in enumerate(devices.in_slot_order()):
            slot = virtio_devices.slot(index)
            base, irq = slot.base, slot.irq
            transport = MmioTransport(device, self._mem, self._irqfd(irq), self._io)
            self.transports.append(transport)
            for q, fd in enumerate(transport.notify_fds):
                self._vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=q)
            # The driver's InterruptACK stays in KVM, which signals an eventfd nobody reads:
            # reading InterruptStatus acknowledges (see Interrupt.read).
            ack = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds.append(ack)
            self._vm.ioeventfd(ack, base + INTERRUPT_ACK, 4)
            self.mmio.insert(transport, base, slot.size)
            self.slots.append(slot)
            log.info("%s: virtio device %d at %#x, IRQ %d", device.name, device.device_id, base, irq)
        n_disks, n_nics = len(devices.disks), len(devices.nets)
        mmio = cast(list[MmioTransport], self.transports)
        self.hotplug = Hotplug(mmio[:n_disks], mmio[n_disks:n_disks + n_nics], self._io, self._pool, quiet,
                               on_deleted)
        return self.slots

    def _add_pci_devices(self, devices: list[VirtioDevice], on_deleted: Callable[[str], None]) -> PciSlots:
        """A PCIe host bridge with the root ports, and each device a function on it: where the
        command line put it (in a root port, or on bus 0), or in the next free slot. Its
        MSI-X vectors (one a queue, one for configuration changes) are GSIs routed as MSI;
        a root port has one vector for its slot's events. Each has INTA# too, on the GSI of
        its slot on bus 0. Returns the root ports."""
        from ..devices.pci.root import CONFIG_ADDRESS_PORT, ConfigPorts, Ecam, PciRoot, devfn  # a PCI machine
        from ..devices.pci.root_port import INTX_PIN, RootPort
        from .msi import GsiRoutes, IntxLine, Vectors
        from .pci_hotplug import PciSlots
        layout = arch.pci_layout(self._mem.regions)
        assert layout is not None       # the configuration allows PCI only where there is some
        self.pci = root = PciRoot(self.mmio, layout.ecam, layout.mmio32, layout.mmio64,
                                  [(r.gpa, r.end) for r in self._mem.regions], layout.intx)
        self.mmio.insert(Ecam(root), *layout.ecam)
        self.pio.insert(ConfigPorts(root), CONFIG_ADDRESS_PORT, 8)
        self._routes = GsiRoutes(self._vm, arch.irqchip_routes())
        ports = self.cfg.root_ports
        in_port = {p.device: name for name, p in ports.items() if p.device is not None}
        on_bus0 = [d for d in devices if d.name not in in_port]
        placed = {name: at for name, at in self.cfg.pci_slots.items()
                  if name in ports or any(d.name == name for d in on_bus0)}

        def place(name: str) -> int:
            at = placed.get(name)
            if at is None:
                at = placed[name] = devfn(root.free_slot(placed.values()))
            return at

        slots = PciSlots(self.cfg, root, self._pci_function, self.transports, on_deleted)
        self._closers.append(slots.close)
        for bus, (name, port) in enumerate(ports.items(), start=1):
            at = place(name)
            vector = Vectors(self._routes, 1, functools.partial(int, at))     # requester ID: bus 0, at
            self._closers.append(vector.close)
            line = IntxLine(self._vm, root.intx_gsi(at, INTX_PIN))
            self._closers.append(line.close)
            mem32, pref64 = root.allocate(False, PORT_MEM32), root.allocate(True, PORT_PREF64)
            slots.ports[name] = RootPort(name, bus, port.slot, port.port, (mem32, PORT_MEM32),
                                         (pref64, PORT_PREF64), vector, slots.powered_off, self._io, line)
            self._closers.insert(0, slots.ports[name].close)        # before its line
            root.add(slots.ports[name], at)
        for device in on_bus0:
            at = place(device.name)
            transport, close = self._pci_function(device, at)
            self._closers.append(close)
            root.add(transport, at)
            self.transports.append(transport)
            log.info("%s: virtio device %d at PCI 00:%02x.%d, %d MSI-X vectors", device.name,
                     device.device_id, at >> 3, at & 7, len(transport.interrupt.vectors.fds))
        for device in devices:
            if device.name in in_port:
                assert isinstance(device, (Block, Net))     # the configuration sees to it
                slots.plug(in_port[device.name], device, hot=False)
        root.mark_multi_function()
        self.transports.sort(key=root.location)     # the order snapshot sections are in
        return slots

    def _pci_function(self, device: VirtioDevice, at: int) -> tuple[PciTransport, Callable[[], None]]:
        """``device`` as a virtio-pci function at ``at`` on bus 0 or behind the port there,
        with its MSI-X vectors and INTA#; and what closes those once the transport is closed."""
        from ..devices.virtio.pci import PciTransport
        from .msi import IntxLine, Vectors
        assert self.pci is not None and self._routes is not None
        root = self.pci
        vectors = Vectors(self._routes, len(device.queue_sizes) + 1, lambda: root.requester_id(transport))
        line = None
        try:
            line = IntxLine(self._vm, self.pci.intx_gsi(at))
            transport = PciTransport(device, self._mem, self._io, vectors, self._notifier, line)
        except BaseException:
            vectors.close()
            if line is not None:
                line.close()
            raise

        def close() -> None:
            vectors.close()
            line.close()
        return transport, close

    def _notifier(self, fd: int, addr: int, assign: bool) -> None:
        """A queue's notification address (any width) signals ``fd`` in KVM."""
        self._vm.ioeventfd(fd, addr, 0, deassign=not assign)

    def add_legacy_devices(self) -> None:
        """The machine's own devices: a PC's on port I/O, or an Arm board's on MMIO."""
        if arch.MACHINE == "aarch64":
            self._add_arm_devices()
        else:
            self._add_pc_devices()

    def _host_console(self) -> Callable[[bytes], None] | None:
        """Where the serial port's output goes: stdout (``-serial stdio``), or Firecracker's
        ``serial_out_path`` (a file or named pipe, opened for appending), stdin feeding it
        either way; None for nowhere."""
        if not self.cfg.serial_stdio:
            return None
        out, path = 1, self.cfg.serial_out_path
        if path is not None:
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except (OSError, ValueError) as e:     # ValueError: a NUL in the path
                raise virtio_devices.DeviceError(f"serial output {path}: {getattr(e, 'strerror', e)}") from e
            self._fds.append(out)
        self.console = HostConsole(self._stop, out_fd=out)
        if self.cfg.serial_rate_limiter is None:
            return self.console.write
        write, bucket = self.console.write, TokenBucket(self.cfg.serial_rate_limiter)

        def limited(data: bytes) -> None:
            """Firecracker's: output the bucket has no room for is dropped, and counted."""
            if bucket.reduce(len(data)) == 0.0:
                write(data)
            elif self.serial is not None:
                self.serial.counters["rate_limiter_dropped_bytes"] += len(data)
        return limited

    def _add_arm_devices(self) -> None:
        uart, rtc, gpio, timer = (arch.BOARD[name] for name in ("uart", "rtc", "gpio", "boot-timer"))
        out = self._host_console()
        self.pl011 = Pl011(out, lambda level: self._vm.irq_line(uart.irq_line, int(level)))
        if self.console:
            self.console.attach(self.pl011.enqueue)
        self.mmio.insert(self.pl011, uart.base, uart.size)
        self.pl031 = Pl031()
        self.mmio.insert(self.pl031, rtc.base, rtc.size)
        self.gpio = Pl061(lambda level: self._vm.irq_line(gpio.irq_line, int(level)))
        self.mmio.insert(self.gpio, gpio.base, gpio.size)
        self.mmio.insert(self.boot_timer, timer.base, timer.size)

    def _add_pc_devices(self) -> None:
        out = self._host_console()
        self.serial = Serial(out, self._irq_line(COM1_IRQ))
        if self.console:
            self.console.attach(self.serial.enqueue)
        high = sum(r.size for r in self._mem.regions[1:])
        # COM1's eighth port (scratch, 0x3ff) is the boot timer.
        self.pio.insert(self.serial, COM1_PORT, BOOT_TIMER_PORT - COM1_PORT)
        self.i8042 = I8042(lambda: self._stop(GUEST_RESET), self._irq_line(I8042_IRQ))
        self.pio.insert(self.i8042, I8042_PORT, 5)
        if self.cfg.acpi:
            self.acpi = AcpiRegisters(lambda: self._stop(GUEST_SHUTDOWN), lambda: self._stop(GUEST_RESET),
                                      self._irq_line(GED_IRQ))
            self.pio.insert(self.acpi, ACPI_PORT_BASE, ACPI_PORT_COUNT)
            self.vmgenid = VmGenId(self._mem, arch.VMGENID_ADDR, self.acpi.vm_generation_changed)
        self.rtc = Rtc(self._mem.regions[0].size, high)
        self.pio.insert(self.rtc, RTC_PORT, 2)
        self.pio.insert(self.boot_timer, BOOT_TIMER_PORT, 1)
        self.pio.insert(PostPort(), POST_PORT, 1)

    def board_devices(self) -> dict[str, Persistent[Any]]:
        """The machine's own devices whose state a snapshot keeps, by their section's name
        (after :meth:`add_legacy_devices`): a PC's UART, keyboard controller and CMOS, an Arm
        board's UART, RTC and GPIO. The boot timer and POST port keep none."""
        if arch.MACHINE == "aarch64":
            assert self.pl011 is not None and self.pl031 is not None and self.gpio is not None
            return {"pl011": self.pl011, "pl031": self.pl031, "pl061": self.gpio}
        assert self.serial is not None and self.i8042 is not None and self.rtc is not None
        return {"serial": self.serial, "i8042": self.i8042, "rtc": self.rtc}

    def firmware_devices(self) -> arch.FirmwareDevices:
        """What the devices put in the firmware, each describing itself (after
        :meth:`add_legacy_devices`). On a PC, the DSDT lists the legacy devices, the virtio-mmio
        slots, the VM generation ID, then the ACPI registers' power button and GED, whose
        ``_EVT`` notifies both of those; an Arm board's device tree lists the slots."""
        if arch.MACHINE == "aarch64":
            layout = arch.pci_layout(self._mem.regions) if self.pci is not None else None
            return arch.FirmwareDevices([(s.base, s.irq) for s in self.slots],  # type: ignore[call-arg, misc]
                                        layout)  # type: ignore[arg-type]
        assert self.serial is not None and self.i8042 is not None and self.rtc is not None
        reset, pci = self.i8042.reset_register, self.pci is not None
        if self.acpi is None or self.vmgenid is None:
            return arch.FirmwareDevices((), None, 0, reset, pci)
        slots: tuple[bytes, ...] = tuple(s.acpi_device() for s in self.slots)
        flags, tables = self.i8042.boot_flags | BOOT_NO_MSI, {}
        if self.pci is not None:
            slots, flags = self.pci.acpi_devices(), self.i8042.boot_flags
            tables = {"MCFG": self.pci.mcfg()}
        dsdt = (self.serial.acpi_device(), self.i8042.acpi_device(), self.rtc.acpi_device(),
                *slots, self.vmgenid.acpi_device(), self.acpi.acpi_device())
        return arch.FirmwareDevices(dsdt, self.acpi.power_registers, flags, reset, pci, tables)

    def press_gpio_power_button(self) -> None:
        """Press the board's power button (its GPIO line) and release it 100 ms later, as
        QEMU's gpio-key does: Linux's gpio-keys reads the line after its debounce time."""
        assert self.gpio is not None and arch.POWER_BUTTON_LINE is not None
        gpio, line = self.gpio, arch.POWER_BUTTON_LINE
        gpio.set_line(line, True)
        self._io.call_later(POWER_BUTTON_HOLD, lambda: gpio.set_line(line, False))

    def reset(self) -> None:
        """Reset every virtio device, as the reset line does (device work is held still); on
        PCI, every function, configuration space included."""
        if self.pci is not None:
            self.pci.reset()
            return
        for t in self.transports:
            t.reset()

    def announce_nics(self) -> None:
        """Announce every NIC on its tap (see Net.announce): the VM has come here."""
        for t in self.transports:
            if isinstance(t.device, Net):
                t.device.announce()

    def take_counters(self) -> dict[str, collections.Counter[str]]:
        """The devices' counters since the last call, by the name Firecracker's metrics give
        each: block_ID, net_ID, entropy, balloon, vsock, mmds (all NICs'), uart."""
        groups: dict[str, collections.Counter[str]] = {}

        def take(group: str, owner: Any) -> None:
            counters, owner.counters = owner.counters, collections.Counter()
            groups.setdefault(group, collections.Counter()).update(counters)

        for t in self.transports:
            device = t.device
            group = _METRIC_GROUPS.get(device.device_id)
            if group is None or device.name.startswith(("disk-slot", "nic-slot")):
                continue
            take(group.format(device.name), device)
            if isinstance(device, Net) and device.mmds is not None:
                take("mmds", device.mmds)
        if self.serial is not None:
            take("uart", self.serial)
        return groups

    def quiesce(self) -> None:
        for t in self.transports:
            t.device.quiesce()

    def close(self) -> None:
        for t in self.transports:
            t.close()
        self.transports.clear()
        for close in self._closers:
            close()
        self._closers.clear()
        if self.hotplug is not None:
            self.hotplug.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
