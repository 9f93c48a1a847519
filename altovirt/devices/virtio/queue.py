"""Split virtqueues (VIRTIO 1.2, section 2.7), seen from the device.

The guest owns every byte of a queue, so nothing it writes is trusted:
ring addresses and sizes are checked once when the queue is activated, and
every descriptor chain is walked with its index, length, address, nesting and
ordering checked. Any violation raises :class:`QueueError`, which the
transport turns into DEVICE_NEEDS_RESET for that one device.

Buffers are handed to devices with no copies, split into the device-readable
part and the device-writable part of the chain: as memoryviews of guest RAM,
or by address for the kernel to read or fill (an IoVec, see memory.py). A
device returns a chain with :meth:`Queue.add_used` once it has written what it
will: that is where the chain's device-writable buffers are noted as written by
the VMM (for a live migration; see memory.py), never before the data is in.
"""

from __future__ import annotations

import ctypes as C
import struct
from typing import TYPE_CHECKING

from ...errors import AltoVirtError
from ...memory import GuestMemory, GuestMemoryError, IoVec
from .barrier import mb, rmb, wmb

if TYPE_CHECKING:
    from .persist import QueueState

# Descriptor flags (2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags (2.7.7, 2.7.10)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
# Feature bits that change how a split queue works (6)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29

MAX_QUEUE_SIZE = 32768          # 2.7: Queue Size is at most 32768
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
# The used ring's fields are written as ctypes objects over guest RAM: setting one is one
# store. struct.pack_into clears its target before it writes it, so a driver reading the
# used idx in between saw 0, and a Linux guest took an old element for a new one ("id N is
# not a head!"). Native order is virtio's little-endian on every host we run on.
_USED_ELEM = C.c_uint64         # 2.7.8: le32 id, le32 len
_IN_ORDER = list(range(1, MAX_QUEUE_SIZE))  # the next fields of a table written in order
# Tables shorter than this are walked: the bulk path's fixed cost (about 3 us here) is more
# than a walk's 0.5 us a descriptor below 8 (a frame to send has 2 or 3).
BULK_TABLE = 8


def _ring_ranges(size: int, desc: int, avail: int, used: int) -> tuple[tuple[int, int], ...]:
    """The split rings' extents (2.7.5, 2.7.6, 2.7.8), each with its event index field."""
    return (desc, DESC_SIZE * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)


class QueueError(AltoVirtError):
    """The driver broke the virtqueue rules; the message says how."""


class DescriptorChain:
    """One request: its head index and its buffers, the device-readable ones first, as guest
    addresses and lengths (each checked to be RAM when the chain was taken). Views of them
    are made when first asked for: a disk request's data goes to the kernel by address
    (:meth:`GuestMemory.iovec`) and never needs one."""

    __slots__ = ("_iovec", "_mem", "_views", "addrs", "head", "lengths", "readable_count")

    def __init__(self, head: int, mem: GuestMemory, addrs: list[int], lengths: list[int],
                 readable_count: int, views: list[memoryview] | None = None,
                 iovec: IoVec | None = None) -> None:
        self.head = head
        self.addrs, self.lengths, self.readable_count = addrs, lengths, readable_count
        self._mem, self._views, self._iovec = mem, views, iovec

    @property
    def views(self) -> list[memoryview]:
        if self._views is None:
            self._views = self._mem.views(self.addrs, self.lengths)
        return self._views

    @property
    def iovec(self) -> IoVec:
        """The buffers as the kernel takes them (:meth:`GuestMemory.iovec`)."""
        if self._iovec is None:
            self._iovec = self._mem.iovec(self.addrs, self.lengths)
        return self._iovec

    def part_iovec(self, first: int, last: int | None = None) -> IoVec:
        """Buffers ``first`` to ``last`` (not included) as :attr:`iovec` has them, made from
        those buffers alone unless the whole chain's is made already."""
        if self._iovec is not None:
            return self._iovec.part(first, last)
        return self._mem.iovec(self.addrs[first:last], self.lengths[first:last])

    @property
    def readable(self) -> list[memoryview]:
        return self.views[:self.readable_count]

    @property
    def writable(self) -> list[memoryview]:
        return self.views[self.readable_count:]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The device-writable buffers' guest addresses and lengths."""
        rc = self.readable_count
        return list(zip(self.addrs[rc:], self.lengths[rc:], strict=True))

    def read_all(self) -> bytes:
        return b"".join(self.readable)

    @property
    def writable_len(self) -> int:
        return sum(self.lengths[self.readable_count:])


def write_at(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` into a buffer split across ``views``."""
    if views and offset + len(data) <= len(views[0]):     # the usual case: all in the first view
        views[0][offset:offset + len(data)] = data
        return
    rest = memoryview(data)          # slices of it copy nothing
    for v in views:
        if offset < len(v):
            n = min(len(v) - offset, len(rest))
            v[offset:offset + n] = rest[:n]
            rest, offset = rest[n:], 0
            if not rest:
                return
        else:
            offset -= len(v)


def read_at(views: list[memoryview], length: int) -> bytes:
    """The first ``length`` bytes of a buffer split across ``views``."""
    out = bytearray()
    for v in views:
        out += v[:length - len(out)]
        if len(out) == length:
            break
    return bytes(out)


def views_from(views: list[memoryview], offset: int) -> list[memoryview]:
    """The part of a split buffer that starts at ``offset``."""
    out = []
    for v in views:
        if offset >= len(v):
            offset -= len(v)
        else:
            out.append(v[offset:])
            offset = 0
    return out


class Queue:
    """Driver-programmed queue state plus the device's own ring positions, in ``mem``."""

    def __init__(self, max_size: int, mem: GuestMemory, notifier: int = -1) -> None:
        """``notifier``: the eventfd KVM signals when the driver notifies this queue."""
        self.max_size = max_size
        self.mem = mem
        self.notifier = notifier
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used: int | None = None
        self._notify = True
        self.active = False             # the rings are mapped and in use

    # --- activation ---
    def activate(self, features: int) -> None:
        """Check the ring layout the driver programmed and map the rings."""
        self._bind(self._map(self.size, self.desc_addr, self.avail_addr, self.used_addr))
        self.active = True
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        self.next_avail = self.next_used = 0
        self._signalled_used = None

    def ring_ranges(self) -> tuple[tuple[int, int], ...]:
        """(guest address, length) of the descriptor table, the available and the used ring."""
        return _ring_ranges(self.size, self.desc_addr, self.avail_addr, self.used_addr)

    def _map(self, size: int, desc: int, avail: int, used: int) -> tuple[memoryview, memoryview, memoryview]:
        if not size or size > self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 in [1, {self.max_size}]")
        if desc % 16 or avail % 2 or used % 4:
            raise QueueError("misaligned ring address (2.7: descriptors 16, avail 2, used 4)")
        try:
            d, a, u = (self.mem.view(addr, n) for addr, n in _ring_ranges(size, desc, avail, used))
            return d, a, u
        except GuestMemoryError as e:
            raise QueueError(f"ring outside guest RAM: {e}") from e

    def _bind(self, rings: tuple[memoryview, memoryview, memoryview]) -> None:
        """Use ``rings`` (from :meth:`_map`), with the used ring's fields the driver reads
        while we write them (2.7.8: flags, idx, the elements, avail_event)."""
        self._desc, self._avail, used = rings
        self._used_flags = C.c_uint16.from_buffer(used, 0)
        self._used_idx = C.c_uint16.from_buffer(used, 2)
        self._used_ring = (_USED_ELEM * self.size).from_buffer(used, 4)
        self._avail_event = C.c_uint16.from_buffer(used, 4 + 8 * self.size)

    # --- saved state ---
    def save(self) -> QueueState:
        from .persist import QueueState  # only when saving: see persist's docstring
        return QueueState(self.max_size, self.size, self.ready, self.desc_addr, self.avail_addr,
                          self.used_addr, self.active, self.event_idx, self.indirect,
                          self.next_avail, self.next_used,
                          -1 if self._signalled_used is None else self._signalled_used)

    def restore(self, state: QueueState) -> None:
        """Take ``state`` (an active queue's rings are mapped again); SavedStateError,
        with this queue unchanged, if the state could not have been saved from it."""
        from ...persist import SavedStateError, check, check_int
        check(state.max_size == self.max_size,
              f"a queue of at most {state.max_size} entries cannot restore one of {self.max_size}")
        check_int(state.size, 0, 0xFFFFFFFF, "queue size")        # as the driver wrote it
        for name in ("desc_addr", "avail_addr", "used_addr"):
            check_int(getattr(state, name), 0, (1 << 64) - 1, name)
        check_int(state.next_avail, 0, 0xFFFF, "next_avail")
        check_int(state.next_used, 0, 0xFFFF, "next_used")
        check_int(state.signalled_used, -1, 0xFFFF, "signalled_used")
        check(state.ready or not state.active, "an active queue must be ready")
        rings = None
        if state.active:
            try:
                rings = self._map(state.size, state.desc_addr, state.avail_addr, state.used_addr)
            except QueueError as e:
                raise SavedStateError(str(e)) from e
        self.reset()
        self.size, self.ready = state.size, state.ready
        self.desc_addr, self.avail_addr, self.used_addr = state.desc_addr, state.avail_addr, state.used_addr
        self.event_idx, self.indirect = state.event_idx, state.indirect
        self.next_avail, self.next_used = state.next_avail, state.next_used
        self._signalled_used = None if state.signalled_used < 0 else state.signalled_used
        if rings is not None:
            self._bind(rings)
            self.active = True

    # --- the available ring ---
    def avail_idx(self) -> int:
        return int(_U16.unpack_from(self._avail, 2)[0])

    def has_available(self) -> bool:
        return self.avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; QueueError if it is malformed."""
        next_avail, size = self.next_avail, self.size
        avail = _U16.unpack_from(self._avail, 2)[0]     # avail_idx(), inlined: a hot path
        if avail == next_avail:
            return None
        if (avail - next_avail) & 0xFFFF > size:
            raise QueueError(f"avail idx {avail} is more than {size} ahead of {next_avail}")
        rmb()           # the ring entry and descriptors as the driver wrote them before the index
        head = _U16.unpack_from(self._avail, 4 + 2 * (next_avail % size))[0]
        self.next_avail = next_avail = (next_avail + 1) & 0xFFFF
        if self.event_idx and self._notify:
            # avail_event: tell the driver to notify us for the next new buffer (2.7.10)
            self._avail_event.value = next_avail
        return self._chain(head)

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` available chains, in order: :meth:`pop` called that many times, with
        the index, its barrier and avail_event once (a device that takes buffers by the dozen,
        as virtio-net's receive does). QueueError if one is malformed: those before it stay
        popped, as one by one."""
        next_avail, size = self.next_avail, self.size
        count = (_U16.unpack_from(self._avail, 2)[0] - next_avail) & 0xFFFF
        if count > size:
            raise QueueError(f"avail idx {(next_avail + count) & 0xFFFF} is more than {size} ahead of "
                             f"{next_avail}")
        rmb()
        chains = []
        avail, chain = self._avail, self._chain
        for _ in range(min(count, limit)):
            head = _U16.unpack_from(avail, 4 + 2 * (next_avail % size))[0]
            self.next_avail = next_avail = (next_avail + 1) & 0xFFFF
            chains.append(chain(head))
        if chains and self.event_idx and self._notify:
            self._avail_event.value = next_avail
        return chains

    def _chain(self, head: int) -> DescriptorChain:
        """The chain from descriptor ``head``; QueueError if it is malformed."""
        if head < self.size:
            addr, length, flags, _ = _DESC.unpack_from(self._desc, DESC_SIZE * head)
            if not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
                # A single buffer (receive buffers, entropy requests): nothing more to check.
                view = self._buffer(addr, length)
                readable = 0 if flags & VIRTQ_DESC_F_WRITE else 1
                return DescriptorChain(head, self.mem, [addr], [length], readable, [view])
        return self._walk(head)

    def _buffer(self, addr: int, length: int) -> memoryview:
        try:
            return self.mem.view(addr, length)
        except GuestMemoryError as e:
            raise QueueError(f"buffer outside guest RAM: {e}") from e

    def _walk(self, head: int) -> DescriptorChain:
        """The chain from ``head``, checked descriptor by descriptor (views of its buffers
        are made only if the device asks: a disk's never are)."""
        mem = self.mem
        addrs: list[int] = []
        lengths: list[int] = []
        readable = 0
        table, n, index = self._desc, self.size, head
        seen = 0
        in_indirect = False
        while True:
            if index >= n:
                raise QueueError(f"descriptor index {index} out of range (table of {n})")
            seen += 1
            if seen > n:
                raise QueueError(f"descriptor chain from head {head} loops or exceeds {n} entries")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect or not self.indirect:
                    raise QueueError("indirect descriptor " + ("inside an indirect table" if in_indirect
                                                            else "without VIRTIO_F_INDIRECT_DESC"))
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with NEXT set (2.7.5.3.1)")
                if not length or length % DESC_SIZE:
                    raise QueueError(f"indirect table length {length} is not a multiple of 16")
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError as e:
                    raise QueueError(f"indirect table outside guest RAM: {e}") from e
                if not addrs and (chain := self._take_table(head, table)) is not None:
                    return chain
                n, index, seen, in_indirect = length // DESC_SIZE, 0, 0, True
                continue
            try:
                mem.host_address_of(addr, length)       # RAM, or the chain is refused here
            except GuestMemoryError as e:
                raise QueueError(f"buffer outside guest RAM: {e}") from e
            addrs.append(addr)
            lengths.append(length)
            if not flags & VIRTQ_DESC_F_WRITE:
                if readable < len(addrs) - 1:
                    raise QueueError("device-readable descriptor after a device-writable one (2.7.4.2)")
                readable += 1
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, mem, addrs, lengths, readable)
            index = nxt

    def _take_table(self, head: int, table: memoryview) -> DescriptorChain | None:
        """The chain in an indirect ``table`` laid out as Linux writes one (each descriptor's
        next is the one after it, device-readable buffers first), taken in a few bulk
        operations rather than a step a descriptor (a 1 MiB disk request has 256 of them); None
        for any other table, which :meth:`_walk` checks one by one."""
        n = len(table) // DESC_SIZE
        if not BULK_TABLE <= n <= self.size:    # 2.7.5.3.1: not longer than the queue
            return None
        raw = memoryview(bytes(table))  # one read: the driver cannot change it between checks
        halves = raw.cast("H")
        flags, nexts = halves[6::8].tolist(), halves[7::8].tolist()
        last = flags.pop()
        readable = flags.count(VIRTQ_DESC_F_NEXT)
        if (nexts[:-1] != _IN_ORDER[:n - 1] or last & ~VIRTQ_DESC_F_WRITE
                or readable + flags.count(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) != n - 1
                or VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE in flags[:readable]):
            return None
        if not last:                    # the last one is device-readable: so must all be
            if readable != n - 1:
                return None
            readable = n
        addrs, lengths = raw.cast("Q")[0::2].tolist(), raw.cast("I")[2::4].tolist()
        try:
            iovec = self.mem.iovec(addrs, lengths)      # checks them all, and is wanted anyway
        except GuestMemoryError as e:
            raise QueueError(f"buffer outside guest RAM: {e}") from e
        return DescriptorChain(head, self.mem, addrs, lengths, readable, iovec=iovec)

    def notifications(self, enable: bool) -> None:
        """Ask the driver to notify us of new buffers, or not to (2.7.7, 2.7.10). A device busy
        with the queue turns them off, and must look at the queue again after turning them on:
        buffers made available in between came without a notification."""
        self._notify = enable
        if self.event_idx:
            if enable:
                self._avail_event.value = self.next_avail
        else:
            self._used_flags.value = 0 if enable else VIRTQ_USED_F_NO_NOTIFY
        if enable:
            # The driver stores avail idx then loads our field; we store our field then load
            # avail idx. Without a barrier both could miss the other's store: a lost notification.
            mb()

    def undo_pop(self, count: int = 1) -> None:
        """Give the last ``count`` popped chains back (the device could not take them yet)."""
        self.next_avail = (self.next_avail - count) & 0xFFFF

    # --- the used ring ---
    def add_used(self, chain: DescriptorChain, length: int, publish: bool = True) -> None:
        """Return ``chain`` to the driver, with ``length`` bytes written into its device-writable
        buffers, all of which are noted as written (the device writes nothing into a chain it
        has returned). With ``publish`` False the driver sees it only at the next
        :meth:`publish_used` (to finish writing what the elements refer to)."""
        if self.mem.tracking_writes:
            self.mem.mark_spans(chain.spans)
        self._used_ring[self.next_used % self.size] = chain.head | length << 32
        self.next_used = (self.next_used + 1) & 0xFFFF
        if publish:
            wmb()       # the buffers' contents and the element before the index
            self._used_idx.value = self.next_used

    def publish_used(self) -> None:
        wmb()
        self._used_idx.value = self.next_used

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one."""
        # The used index stored, then the driver's wish loaded, while the driver stores its wish
        # and then loads the index: without a barrier both can miss the other's (a lost interrupt).
        mb()
        if not self.event_idx:
            flags = _U16.unpack_from(self._avail, 0)[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old is None:
            return True
        used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
        # vring_need_event() (2.7.10): did new pass used_event since old?
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
