"""Which virtio devices a configuration asks for, and where they sit.

Slots are the architecture's (:func:`altovirt.arch.mmio_slot`): on x86_64 4 KiB
each in the 32-bit gap, as in Firecracker. Linux finds the devices in the ACPI
DSDT (distro kernels, :meth:`MmioSlot.acpi_device`) or through ``virtio_mmio.device=``
on its command line (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, :meth:`MmioSlot.cmdline_entry`).

When the VM has a QMP channel, hot-plug works as StratoVirt's microvm does it
("hot-replace"): every disk and NIC slot the limits allow exists from boot,
the configured devices in the first ones and empty devices (a disk of no
sectors, a NIC with its link down) in the rest, ready to take a backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import arch
from ..acpi import aml
from ..backends import BackendError
from ..backends.blockfile import BlockFile
from ..backends.tap import Tap
from ..backends.unix import UnixListener
from ..config import VmConfig
from ..config.model import MAX_DRIVES, MAX_NICS, FsConfig, MmdsConfig, NetConfig, VsockConfig
from ..devices.virtio.block import QUEUE_SIZE, Block, WorkerPool
from ..devices.virtio.console import Console
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.net import Net, random_mac
from ..devices.virtio.rng import Rng
from ..errors import EXIT_USAGE, AltoVirtError
from ..eventloop import EventLoop
from ..memory import PAGE_SHIFT

if TYPE_CHECKING:
    from ..backends.uring import Ring
    from ..devices.virtio.balloon import Balloon
    from ..devices.virtio.vsock import Vsock
    from ..mmds.stack import MmdsStack
    from ..mmds.store import Mmds

log = logging.getLogger(__name__)
VIRTIO_MMIO_HID = "LNRO0005"         # what drivers/virtio/virtio_mmio.c matches in ACPI


class DeviceError(AltoVirtError, ValueError):
    """A configured device cannot be created (busy image, missing tap...): a configuration
    the host cannot honour, so a usage error."""

    exit_status = EXIT_USAGE


@dataclass
class DeviceSet:
    disks: list[Block]
    nets: list[Net]
    others: list[VirtioDevice]
    vsock: Vsock | None = None      # the userspace vsock device, also among the others
    balloon: Balloon | None = None  # also among the others
    mmds: Mmds | None = None        # the metadata store the NICs named in cfg.mmds answer from

    def in_slot_order(self) -> list[VirtioDevice]:
        """Disks first (vda, vdb...), then NICs (eth0, eth1), then the others."""
        return [*self.disks, *self.nets, *self.others]


def empty_disk(slot: int, pool: WorkerPool) -> Block:
    return Block(f"disk-slot{slot}", None, pool)


def empty_nic(slot: int, io: EventLoop, mac: str | None = None) -> Net:
    return Net(f"nic-slot{slot}", None, mac or random_mac(), io)


def _ring(drive: str) -> Ring | None:
    """An io_uring for a disk with io_engine Async; None, said in the log, where the kernel
    gives none (the workers serve the disk, as io_engine Sync)."""
    from ..backends.uring import Ring, UringError  # only a VM with such a disk
    try:
        return Ring(QUEUE_SIZE)
    except UringError as e:
        log.warning("-drive id=%s: io_engine Async without io_uring (%s): the thread pool serves it",
                    drive, e.strerror)
        return None


def devices_for(cfg: VmConfig, io: EventLoop, pool: WorkerPool, hotplug: bool,
                emit: Callable[[str, dict[str, object]], None]) -> DeviceSet:
    """The configured devices, with the empty hot-plug slots if ``hotplug``; ``emit`` sends
    the events devices raise (the balloon's BALLOON_CHANGE)."""
    devices = DeviceSet([], [], [])
    if cfg.mmds is not None:
        devices.mmds = _mmds(cfg.mmds)
    where = ""
    try:
        for d in cfg.drives:
            where = f"-drive id={d.id}"
            # A VM that waits for a migration takes its images' locks once the source lets go.
            image = BlockFile(d.path, read_only=d.read_only, direct=d.direct, lock=cfg.incoming is None)
            devices.disks.append(Block(d.id, image, pool, (d.serial or "").encode(), d.rate_limiter,
                                       _ring(d.id) if d.io_engine == "Async" else None))
        for n in cfg.nets:
            where = f"-netdev id={n.id}"
            stack = None
            if devices.mmds is not None and cfg.mmds is not None and n.id in cfg.mmds.network_interfaces:
                from ..mmds.stack import MmdsStack
                stack = MmdsStack(devices.mmds, cfg.mmds.ipv4_address)
            devices.nets.append(_nic(n, io, stack))
        if cfg.console is not None:
            where = f"-chardev id={cfg.console.id}"
            devices.others.append(Console(cfg.console.id, UnixListener(cfg.console.socket_path), io))
        if cfg.vsock is not None and cfg.vsock.vhost:
            where = f"-device vhost-vsock-device id={cfg.vsock.id}"
            devices.others.append(_vhost_vsock(cfg.vsock))
        elif cfg.vsock is not None:
            where = f"-device vsock id={cfg.vsock.id}"
            assert cfg.vsock.uds_path is not None       # validation fills in the default
            from ..devices.virtio.vsock import Vsock  # only for a VM that has one (start-up)
            devices.vsock = Vsock(cfg.vsock.id, cfg.vsock.guest_cid, UnixListener(cfg.vsock.uds_path), io)
            devices.others.append(devices.vsock)
        if cfg.fs is not None:
            where = f"-device vhost-user-fs-device id={cfg.fs.id}"
            devices.others.append(_fs(cfg.fs, io))
    except BackendError as e:
        for dev in devices.in_slot_order():
            dev.close()
        raise DeviceError(f"{where}: {e.strerror}") from e
    if cfg.balloon is not None:
        from ..devices.virtio.balloon import Balloon  # only for a VM that has one

        def balloon_changed(pages: int) -> None:        # QEMU's BALLOON_CHANGE: the guest's memory
            emit("BALLOON_CHANGE", {"actual": cfg.mem_size - (pages << PAGE_SHIFT)})

        devices.balloon = Balloon("balloon", cfg.balloon, balloon_changed)
        devices.others.append(devices.balloon)
    if cfg.rng is not None:
        devices.others.append(Rng(cfg.rng.id, cfg.rng.max_bytes, cfg.rng.period_ms, cfg.rng.rate_limiter))
    if hotplug:
        devices.disks += [empty_disk(i, pool) for i in range(len(devices.disks), MAX_DRIVES)]
        devices.nets += [empty_nic(i, io) for i in range(len(devices.nets), MAX_NICS)]
    return devices


def _mmds(cfg: MmdsConfig) -> Mmds:
    """The metadata store, holding the configured document, which it keeps in ``cfg``."""
    from ..mmds.store import Mmds  # only for a VM that has one (start-up)
    store = Mmds(cfg.size_limit)
    store.version, store.imds_compat = cfg.version, cfg.imds_compat
    if cfg.data is not None:
        store.put(cfg.data)
    store.watch(lambda data: setattr(cfg, "data", data))
    return store


def _nic(n: NetConfig, io: EventLoop, mmds: MmdsStack | None) -> Net:
    tap = Tap.from_fd(n.fd) if n.fd is not None else Tap(n.tap)
    if not n.vhost:
        return Net(n.id, tap, n.mac, io, n.rx_rate_limiter, n.tx_rate_limiter, mmds)
    from ..backends.vhost import Vhost  # only for a VM that uses it
    from ..devices.virtio.vhost_net import VhostNet
    try:
        vhost = Vhost(fd=n.vhost_fd)
    except BackendError:
        tap.close()
        raise
    return VhostNet(n.id, tap, n.mac, io, vhost)


def _vhost_vsock(v: VsockConfig) -> VirtioDevice:
    from ..devices.virtio.vhost_vsock import VhostVsock, open_vhost_vsock  # only for a VM that uses it
    return VhostVsock(v.id, v.guest_cid, open_vhost_vsock(v.guest_cid, v.vhost_fd))


def _fs(f: FsConfig, io: EventLoop) -> VirtioDevice:
    from ..backends.vhost_user import VhostUser  # only for a VM that uses it
    from ..devices.virtio.vhost_user_fs import VhostUserFs
    return VhostUserFs(f.id, f.tag, VhostUser(f.socket_path), io)


@dataclass(frozen=True)
class MmioSlot:
    """Where the virtio-mmio transport of slot ``index`` sits: ``size`` bytes at ``base``,
    interrupt ``irq``."""

    index: int
    base: int
    size: int
    irq: int

    def acpi_device(self) -> bytes:
        """The slot in the DSDT: a Device term for ``\\_SB`` (ACPI 6.4, 6.4.3: Memory32Fixed and
        an extended interrupt, edge-triggered, active high)."""
        return aml.device(f"V{self.index:03X}", aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
                          aml.name("_UID", aml.integer(self.index)),
                          aml.crs(aml.memory32_fixed(self.base, self.size), aml.interrupt(self.irq)))

    def cmdline_entry(self) -> str:
        """The slot on the kernel command line (Linux's virtio_mmio.device=<size>@<base>:<irq>)."""
        return f"virtio_mmio.device={self.size >> 10}K@{self.base:#x}:{self.irq}"


def slot(index: int) -> MmioSlot:
    """Slot ``index``, where the architecture puts it."""
    return MmioSlot(index, *arch.mmio_slot(index))
