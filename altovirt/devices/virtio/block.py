"""virtio-blk (VIRTIO 1.2, section 5.2) on a raw image.

A request is a header (type, reserved, sector), data, and a status byte
the device writes last. The header and data may be split across any number
of descriptors; data moves between the image and guest RAM with no copies.
I/O errors become VIRTIO_BLK_S_IOERR, unknown types VIRTIO_BLK_S_UNSUPP; a
request whose shape breaks the rules (no status byte, data to write into a
device-readable buffer) puts the device in DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct

from ...backends.blockfile import SECTOR_SIZE, BlockFile
from .device import COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice
from .queue import DescriptorChain, QueueError

log = logging.getLogger(__name__)

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
# Request types and status (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2            # the header and status take one descriptor each
MAX_DISCARD_SECTORS = (1 << 32) - 1
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")     # sector, num_sectors, flags
# struct virtio_blk_config, up to write_zeroes_may_unmap (5.2.4)
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class RequestError(Exception):
    """A request the device completes with a status other than OK."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Block(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, image: BlockFile, serial: str | None = None) -> None:
        super().__init__(name)
        self.image = image
        self.serial = (serial or "").encode()[:VIRTIO_BLK_ID_BYTES]
        self.capacity = image.size // SECTOR_SIZE
        self.config = bytearray(_CONFIG.pack(
            self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE,    # capacity .. geometry, blk_size
            0, 0, 0, 0,                                        # topology
            0, 0, 1,                                           # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, 1, 1,                         # discard: sectors, segments, alignment
            MAX_DISCARD_SECTORS, 1, 1))                        # write zeroes: sectors, segments, may unmap

    def device_features(self) -> int:
        features = COMMON_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE \
            | 1 << VIRTIO_BLK_F_FLUSH
        if self.image.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def queue_notify(self, index: int) -> None:
        queue, interrupt = self.queues[0], self.interrupt
        assert interrupt is not None
        completed = False
        while True:
            try:
                chain = queue.pop()
                if chain is None:
                    break
                written = self._handle(chain)
            except QueueError as e:
                self.fail(str(e))
                return
            queue.add_used(chain.head, written)
            completed = True
        if completed:
            interrupt.signal_used(queue)

    def _handle(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written to the driver's buffers."""
        if not chain.writable or len(chain.writable[-1]) < 1:
            raise QueueError("block request without a writable status byte (5.2.6)")
        status_view = chain.writable[-1][-1:]
        readable = [v for v in chain.readable if len(v)]
        header = b"".join(bytes(v) for v in _take(readable, _HEADER.size))
        if len(header) < _HEADER.size:
            raise QueueError("block request header shorter than 16 bytes")
        kind, _, sector = _HEADER.unpack(header)
        data_in = _drop_last_byte(chain.writable)      # buffers the device fills
        written = 1
        try:
            if kind == VIRTIO_BLK_T_IN:
                if readable:
                    raise QueueError("read request with device-readable data buffers")
                self._check_range(sector, _total(data_in))
                self.image.read(sector * SECTOR_SIZE, data_in)
                written += _total(data_in)
            elif kind == VIRTIO_BLK_T_OUT:
                if data_in:
                    raise QueueError("write request with device-writable data buffers")
                if self.image.read_only:
                    raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
                self._check_range(sector, _total(readable))
                self.image.write(sector * SECTOR_SIZE, readable)
            elif kind == VIRTIO_BLK_T_FLUSH:
                self.image.flush()
            elif kind == VIRTIO_BLK_T_GET_ID:
                n = _fill(data_in, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
                written += n
            elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                self._ranges(kind, b"".join(bytes(v) for v in readable))
            else:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {kind}")
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            log.debug("%s: %s", self.name, e)
            status = e.status
            if kind == VIRTIO_BLK_T_IN:
                written = 1
        except OSError as e:
            log.warning("%s: I/O error: %s", self.name, e)
            status = VIRTIO_BLK_S_IOERR
        status_view[0] = status
        return written

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"transfer of {length} bytes is not whole sectors")
        if sector * SECTOR_SIZE + length > self.capacity * SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"sector {sector} + {length} bytes is beyond the disk")

    def _ranges(self, kind: int, data: bytes) -> None:
        if self.image.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "discard or write zeroes on a read-only disk")
        if not data or len(data) % _SEGMENT.size:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "malformed discard/write-zeroes segments")
        for sector, count, flags in _SEGMENT.iter_unpack(data):
            self._check_range(sector, count * SECTOR_SIZE)
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if kind == VIRTIO_BLK_T_DISCARD:
                if flags:
                    raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard with flags set")
                self.image.discard(offset, length)
            else:
                self.image.write_zeroes(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))

    def close(self) -> None:
        self.image.close()


def _total(views: list[memoryview]) -> int:
    return sum(len(v) for v in views)


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """Remove and return the first ``n`` bytes of ``views`` (in place)."""
    taken = []
    while n and views:
        v = views[0]
        if len(v) <= n:
            taken.append(views.pop(0))
            n -= len(v)
        else:
            taken.append(v[:n])
            views[0] = v[n:]
            n = 0
    return taken


def _drop_last_byte(views: list[memoryview]) -> list[memoryview]:
    out = [v for v in views[:-1] if len(v)]
    if len(views[-1]) > 1:
        out.append(views[-1][:-1])
    return out


def _fill(views: list[memoryview], data: bytes) -> int:
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos:pos + n]
        pos += n
        if pos == len(data):
            break
    return pos
