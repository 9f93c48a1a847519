"""The virtio-pci transport, modern only (VIRTIO 1.2, section 4.1).

One PCI function a device, vendor 0x1AF4 and device 0x1040 + its virtio ID, with one
64-bit BAR that holds the common configuration, the ISR, the device's configuration, the
notification addresses (one a queue, each with its own ioeventfd) and the MSI-X table and
PBA. Each queue and the configuration change have their own MSI-X vector when the driver
asks (Linux does), so an interrupt costs the guest no register read at all. A driver without
MSI-X (Linux booted with ``pci=nomsi``) gets INTA#, held from an event until it reads the ISR
(4.1.4.5).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...eventloop import EventLoop
from ...memory import GuestMemory
from ..pci.config import CAP_ID_VENDOR, Bar, ConfigSpace
from ..pci.intx import Intx, IntxLine
from ..pci.msix import NO_VECTOR, MsiVectors, Msix
from ..pci.root import PciFunction
from .device import VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, Device, Interrupt
from .queue import Queue
from .transport import VirtioTransport

if TYPE_CHECKING:
    from .persist import PciFunctionState

log = logging.getLogger(__name__)

VENDOR = 0x1AF4                 # 4.1.2.1: Red Hat's virtio vendor ID
DEVICE_BASE = 0x1040            # + the virtio device ID, for a non-transitional device
REVISION = 1                    # 4.1.2.1: at least 1 for a non-transitional device
SUBSYSTEM = 0x1100              # QEMU's subsystem ID for its virtio functions
# Class codes by virtio device ID (what QEMU gives them); others are "unclassified".
CLASS_CODES = {1: 0x020000, 2: 0x010000, 3: 0x078000}
CLASS_OTHER = 0x00FF00

# virtio_pci_cap.cfg_type (4.1.4)
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG = 1, 2, 3, 4, 5
# Where each structure sits in BAR 0.
BAR_INDEX = 0
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x40
ISR_OFFSET, ISR_SIZE = 0x1000, 4
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_MULTIPLIER = 0x3000, 4
TABLE_OFFSET, PBA_OFFSET = 0x4000, 0x6000
BAR_SIZE = 0x8000

# struct virtio_pci_common_cfg (4.1.4.3)
DEVICE_FEATURE_SELECT, DEVICE_FEATURE = 0x00, 0x04
DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES = 0x10, 0x12
DEVICE_STATUS, CONFIG_GENERATION = 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR = 0x16, 0x18, 0x1A
QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30
QUEUE_NOTIFY_DATA, QUEUE_RESET = 0x38, 0x3A
_QUEUE_ADDRESSES = {QUEUE_DESC: "desc_addr", QUEUE_DRIVER: "avail_addr", QUEUE_DEVICE: "used_addr"}

# Assign (True) or drop an ioeventfd: (eventfd, guest address, assign).
Ioeventfd = Callable[[int, int, bool], None]


class PciInterrupt(Interrupt):
    """A virtio-pci function's interrupts: each queue's and the configuration change's
    MSI-X vector, chosen by the driver; without MSI-X, the ISR's bits and INTA# (``intx``,
    which asks :meth:`intx_wanted`), which stays up from an event until the driver reads
    the ISR. Then a back end outside the VMM signals ``call_fd`` (on ``io``), which raises
    INTA# as the VMM's own events do."""

    def __init__(self, vectors: MsiVectors, queues: list[Queue], msix_enabled: Callable[[], bool],
                 on_needs_reset: Callable[[str], None], io: EventLoop) -> None:
        super().__init__(-1, on_needs_reset)
        self.msix_enabled = msix_enabled
        self.vectors = vectors
        self.queues = queues            # the transport's list, which a restore refills in place
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(queues)
        self.intx: Intx | None = None
        self._level = False             # INTA# wanted: an event the driver has not read yet
        self._io = io
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        io.add(self.call_fd, self._called)

    def close(self) -> None:
        self._io.remove(self.call_fd)
        os.close(self.call_fd)
        if self.intx is not None:
            self.intx.close()

    def read(self) -> int:
        """The ISR, as the driver reads it: reading acknowledges, and lowers INTA#."""
        with self._lock:
            status, self.status = self.status, self.status & self._sticky
            self._level = False
        return status

    def intx_wanted(self) -> bool:
        return self._level

    def _called(self) -> None:
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return
        self.trigger(VIRTIO_MMIO_INT_VRING)

    def _raise(self, vector: int) -> None:
        if vector < len(self.vectors.fds):
            os.eventfd_write(self.vectors.fds[vector], 1)

    def _isr(self, bits: int) -> None:
        """The ISR's bits and INTA#, only for a driver without MSI-X (4.1.4.5: it reads them then)."""
        if not self.msix_enabled():
            with self._lock:
                self.status |= bits
                self._level = True
            if self.intx is not None:
                self.intx.update()

    def trigger(self, bits: int = VIRTIO_MMIO_INT_VRING) -> None:
        self._isr(bits)
        if bits & VIRTIO_MMIO_INT_CONFIG:
            self._raise(self.config_vector)
        if bits & VIRTIO_MMIO_INT_VRING:
            for vector in set(self.queue_vectors):
                self._raise(vector)

    def signal_used(self, queue: Queue) -> None:
        if queue.needs_interrupt():
            self._isr(VIRTIO_MMIO_INT_VRING)
            for i, q in enumerate(self.queues):
                if q is queue:
                    self._raise(self.queue_vectors[i])

    def queue_fd(self, index: int) -> int:
        if not self.msix_enabled():
            return self.call_fd
        vector = self.queue_vectors[index]
        return self.vectors.fds[vector] if vector < len(self.vectors.fds) else -1

    def raise_pending(self) -> None:
        """After a restore: every queue's vector once, since what a vector owed is not kept
        (a look at a queue with nothing new costs the driver little)."""
        self.trigger(VIRTIO_MMIO_INT_VRING | self.status)

    def reset_vectors(self) -> None:
        self.config_vector = NO_VECTOR
        self.queue_vectors[:] = [NO_VECTOR] * len(self.queue_vectors)


class PciTransport(VirtioTransport, PciFunction):
    """``device`` as a PCI function whose vectors ``vectors`` delivers (one a queue and one
    for configuration changes); ``ioeventfd`` moves the queues' notification addresses
    with the BAR."""

    interrupt: PciInterrupt

    def __init__(self, device: Device, mem: GuestMemory, io: EventLoop, vectors: MsiVectors,
                 ioeventfd: Ioeventfd, intx: IntxLine | None = None) -> None:
        """``intx``: where INTA# goes (None: the function has no INTx)."""
        config = ConfigSpace(VENDOR, DEVICE_BASE + device.device_id,
                             CLASS_CODES.get(device.device_id, CLASS_OTHER), revision=REVISION,
                             subsystem_vendor=VENDOR, subsystem=SUBSYSTEM, interrupt_pin=1 if intx else 0)
        config.add_bar(Bar(BAR_INDEX, BAR_SIZE, prefetchable=True))
        PciFunction.__init__(self, device.name, config)
        n = len(device.queue_sizes)
        if NOTIFY_OFFSET + NOTIFY_MULTIPLIER * n > TABLE_OFFSET or len(vectors.fds) > 0x800 // 16:
            raise ValueError(f"{device.name}: {n} queues do not fit virtio-pci's BAR")
        VirtioTransport.__init__(self, device, mem, io)
        self.interrupt = PciInterrupt(vectors, self.queues, lambda: self.msix.enabled, self._needs_reset, io)
        if intx is not None:
            self.interrupt.intx = Intx(intx, io, lambda: self.interrupt.intx_wanted() and config.intx_enabled)
        self._ioeventfd = ioeventfd
        self._notify_base: int | None = None        # where the notification addresses are now
        for cfg_type, offset, length in ((COMMON_CFG, COMMON_OFFSET, COMMON_SIZE),
                                         (ISR_CFG, ISR_OFFSET, ISR_SIZE),
                                         (DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE)):
            config.add_capability(CAP_ID_VENDOR, _virtio_cap(16, cfg_type, offset, length))
        config.add_capability(CAP_ID_VENDOR, _virtio_cap(20, NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * n)
                              + struct.pack("<I", NOTIFY_MULTIPLIER))
        # 4.1.4.9: a window onto the BAR through configuration space (bar, offset, length, data).
        self._pci_cfg = config.add_capability(CAP_ID_VENDOR, _virtio_cap(20, PCI_CFG, 0, 0) + bytes(4),
                                              wmask=b"\0\0\xff\0\0\0" + b"\xff" * 12)
        self.msix = Msix(config, vectors, BAR_INDEX, TABLE_OFFSET, PBA_OFFSET)

    def close(self) -> None:
        self.bar_mapped(BAR_INDEX, None)
        super().close()
        self.interrupt.close()

    def unplug(self) -> Device:
        device = super().unplug()
        self.interrupt.close()
        return device

    def reset(self) -> None:
        """The machine resets: the device as the driver's reset leaves it, and MSI-X off
        (the root puts the configuration space back)."""
        super().reset()
        self.msix.reset()

    def save(self, prepare: bool = True) -> PciFunctionState:  # type: ignore[override]
        from .persist import PciFunctionState  # only when saving: see persist's docstring
        with self.lock:
            return PciFunctionState(super().save(prepare), bytes(self.config.data), bytes(self.msix.table),
                                    self.interrupt.config_vector, tuple(self.interrupt.queue_vectors))

    def restore(self, state: PciFunctionState) -> None:  # type: ignore[override]
        """Take ``state``: the transport's, then the configuration space, the MSI-X table and
        the vectors, routed again. SavedStateError, the function unchanged, if the state is
        not of a function like this one. The root maps the BARs where they were saved
        (:meth:`altovirt.devices.pci.root.PciRoot.refresh`)."""
        from ...persist import check
        config = self.config
        check(len(state.msix_table) == len(self.msix.table),
              f"{self.device.name}: the saved MSI-X table is not this function's size")
        check(config.fits(state.config),
              f"{self.device.name}: the saved function is another (its IDs, BARs or capabilities differ)")
        check(len(state.queue_vectors) == len(self.queues), f"{self.device.name}: "
              f"{len(state.queue_vectors)} queue vectors saved for {len(self.queues)} queues")
        check(all(v < self.msix.count or v == NO_VECTOR for v in (state.config_vector, *state.queue_vectors)),
              f"{self.device.name}: a saved vector is past its {self.msix.count}")
        super().restore(state.transport)
        with self.lock:
            config.data[:] = state.config
            self.msix.table[:] = state.msix_table
            self.interrupt.config_vector = state.config_vector
            self.interrupt.queue_vectors[:] = state.queue_vectors
        self.msix.update()

    # --- configuration space ---
    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg + 16
        if data <= offset < data + 4:
            return self._window(offset - data, size, None)
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        data = self._pci_cfg + 16
        if data <= offset < data + 4:
            self._window(offset - data, size, value)
            return
        if self.config.write(offset, size, value):
            self.msix.control_written(offset, size)

    def _window(self, at: int, size: int, value: int | None) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG's data: an access of ``cap.length`` bytes to BAR ``cap.bar``
        at ``cap.offset`` (4.1.4.9.1); other shapes are ignored and read as zero."""
        bar, offset, length = (self.config.get(self._pci_cfg + 4, 1), self.config.get(self._pci_cfg + 8, 4),
                               self.config.get(self._pci_cfg + 12, 4))
        if bar != BAR_INDEX or at or size != length or length not in (1, 2, 4) or offset + length > BAR_SIZE:
            return 0
        if value is None:
            return self.bar_read(BAR_INDEX, offset, length)
        self.bar_write(BAR_INDEX, offset, length, value)
        return 0

    def bar_mapped(self, index: int, addr: int | None) -> None:
        """Move the queues' ioeventfds with the BAR."""
        old = self._notify_base
        for q, fd in enumerate(self.notify_fds):
            if old is not None:
                self._ioeventfd(fd, old + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, False)
            if addr is not None:
                self._ioeventfd(fd, addr + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, True)
        self._notify_base = addr

    # --- BAR 0 ---
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if offset < COMMON_OFFSET + COMMON_SIZE:
            with self.lock:
                return self._common_read(offset, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
            return self.interrupt.read() if offset == ISR_OFFSET else 0
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            with self.lock:
                return self.device.read_config(offset - DEVICE_OFFSET, size)
        if TABLE_OFFSET <= offset < PBA_OFFSET:
            return self.msix.table_read(offset - TABLE_OFFSET, size)
        if PBA_OFFSET <= offset < BAR_SIZE:
            return self.msix.pba_read(offset - PBA_OFFSET, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset < COMMON_OFFSET + COMMON_SIZE:
            with self.lock:
                self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            with self.lock:
                self.device.write_config(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < TABLE_OFFSET:
            # Only reached while the ioeventfd is not in place (the BAR is moving).
            self.kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
        elif TABLE_OFFSET <= offset < PBA_OFFSET:
            self.msix.table_write(offset - TABLE_OFFSET, size, value)

    def _common_read(self, offset: int, size: int) -> int:
        q = self.selected_queue()
        index = self.queue_sel
        if (offset, size) == (DEVICE_FEATURE_SELECT, 4):
            return self.features_sel
        if (offset, size) == (DEVICE_FEATURE, 4):
            return self.device_features_word()
        if (offset, size) == (DRIVER_FEATURE_SELECT, 4):
            return self.driver_features_sel
        if (offset, size) == (DRIVER_FEATURE, 4):
            return self.driver_features >> (32 * self.driver_features_sel) & 0xFFFFFFFF \
                if self.driver_features_sel < 2 else 0
        if (offset, size) == (CONFIG_MSIX_VECTOR, 2):
            return self.interrupt.config_vector
        if (offset, size) == (NUM_QUEUES, 2):
            return len(self.queues)
        if (offset, size) == (DEVICE_STATUS, 1):
            return self.status
        if (offset, size) == (CONFIG_GENERATION, 1):
            return self.config_generation & 0xFF
        if (offset, size) == (QUEUE_SELECT, 2):
            return self.queue_sel
        if q is None:
            return 0
        if (offset, size) == (QUEUE_SIZE, 2):
            return q.size
        if (offset, size) == (QUEUE_MSIX_VECTOR, 2):
            return self.interrupt.queue_vectors[index]
        if (offset, size) == (QUEUE_ENABLE, 2):
            return int(q.ready)
        if (offset, size) in ((QUEUE_NOTIFY_OFF, 2), (QUEUE_NOTIFY_DATA, 2)):
            return index
        field = _QUEUE_ADDRESSES.get(offset & ~7)
        if field is not None and size in (4, 8) and not offset % size:
            value = getattr(q, field) >> (32 if offset & 4 else 0)
            return value & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        q = self.selected_queue()
        if (offset, size) == (DEVICE_FEATURE_SELECT, 4):
            self.features_sel = value
        elif (offset, size) == (DRIVER_FEATURE_SELECT, 4):
            self.driver_features_sel = value
        elif (offset, size) == (DRIVER_FEATURE, 4):
            self.write_driver_features(value)
        elif (offset, size) == (CONFIG_MSIX_VECTOR, 2):
            self.interrupt.config_vector = value if value < self.msix.count else NO_VECTOR
        elif (offset, size) == (DEVICE_STATUS, 1):
            self.set_status(value)
        elif (offset, size) == (QUEUE_SELECT, 2):
            self.queue_sel = value
        elif q is None or q.ready:
            return              # 4.1.4.3.2: a ready queue's settings stay
        elif (offset, size) == (QUEUE_SIZE, 2):
            self.write_queue("size", value)
        elif (offset, size) == (QUEUE_MSIX_VECTOR, 2):
            self.interrupt.queue_vectors[self.queue_sel] = value if value < self.msix.count else NO_VECTOR
        elif (offset, size) == (QUEUE_ENABLE, 2):
            if value == 1:
                self.write_queue("ready", 1)
        elif (field := _QUEUE_ADDRESSES.get(offset & ~7)) is None or size not in (4, 8) or offset % size:
            return
        elif size == 8:
            self.write_queue(field, value & 0xFFFFFFFF)
            self.write_queue(field, value >> 32, high=True)
        else:
            self.write_queue(field, value, high=bool(offset & 4))

    def _reset(self) -> None:
        super()._reset()
        self.interrupt.reset_vectors()


def _virtio_cap(length: int, cfg_type: int, offset: int, size: int) -> bytes:
    """struct virtio_pci_cap after its ID and next pointer: cap_len, cfg_type, bar, id,
    padding, offset, length (4.1.4)."""
    return struct.pack("<BBBBxxII", length, cfg_type, BAR_INDEX, 0, offset, size)
