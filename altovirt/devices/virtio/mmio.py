"""The virtio-mmio transport, version 2 (VIRTIO 1.2, section 4.2).

One 4 KiB slot per device in the 32-bit MMIO gap, announced to Linux as
``virtio_mmio.device=4K@<base>:<irq>`` or in the DSDT. Register accesses arrive on
vCPU threads as MMIO exits; queue notifications do not: KVM signals each queue's
eventfd itself (KVM_IOEVENTFD on QueueNotify with the queue index as datamatch).
"""

from __future__ import annotations

import logging

from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import Device, Interrupt
from .transport import (  # noqa: F401 (the status bits, for the registers' users)
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    VirtioTransport,
)

log = logging.getLogger(__name__)

# Registers (4.2.2)
MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976              # "virt"
MMIO_VERSION = 2
VENDOR = 0x554D4551             # "QEMU", what Linux and QEMU expect from a generic vendor
# The queue registers a driver writes, as the queue fields they set ((field, high half)).
_QUEUE_REGISTERS = {
    QUEUE_NUM: ("size", False), QUEUE_READY: ("ready", False), QUEUE_RESET: ("reset", False),
    QUEUE_DESC_LOW: ("desc_addr", False), QUEUE_DESC_HIGH: ("desc_addr", True),
    QUEUE_DRIVER_LOW: ("avail_addr", False), QUEUE_DRIVER_HIGH: ("avail_addr", True),
    QUEUE_DEVICE_LOW: ("used_addr", False), QUEUE_DEVICE_HIGH: ("used_addr", True),
}


class MmioTransport(VirtioTransport):
    """A BusDevice for one virtio device's slot, whose interrupt raises ``irqfd``."""

    def __init__(self, device: Device, mem: GuestMemory, irqfd: int, io: EventLoop) -> None:
        self.interrupt = Interrupt(irqfd, self._needs_reset)
        super().__init__(device, mem, io)

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            with self.lock:
                return self.device.read_config(offset - CONFIG, size)
        if size != 4:
            log.debug("%s: %d-byte read of register %#x ignored", self.device.name, size, offset)
            return 0
        if offset == INTERRUPT_STATUS:
            # Every interrupt's first question: answered without the transport lock, which the
            # I/O thread holds while it works the queues (the interrupt has a lock of its own).
            return self.interrupt.read()
        with self.lock:
            q = self.selected_queue()
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION:
                return MMIO_VERSION
            if offset == DEVICE_ID:
                return self.device.device_id
            if offset == VENDOR_ID:
                return VENDOR
            if offset == DEVICE_FEATURES:
                return self.device_features_word()
            if offset == QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == STATUS:
                return self.status
            if offset == CONFIG_GENERATION:
                return self.config_generation
            if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
                return 0xFFFFFFFF       # no shared memory regions
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            with self.lock:
                self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4:
            log.debug("%s: %d-byte write of register %#x ignored", self.device.name, size, offset)
            return
        if offset == INTERRUPT_ACK:
            self.interrupt.ack(value)       # without the transport lock, as InterruptStatus
            return
        with self.lock:
            if offset == QUEUE_NOTIFY:
                self.kick(value)
            elif offset == DEVICE_FEATURES_SEL:
                self.features_sel = value
            elif offset == DRIVER_FEATURES:
                self.write_driver_features(value)
            elif offset == DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == QUEUE_SEL:
                self.queue_sel = value
            elif offset == STATUS:
                self.set_status(value)
            elif offset in _QUEUE_REGISTERS:
                field, high = _QUEUE_REGISTERS[offset]
                self.write_queue(field, value, high)
