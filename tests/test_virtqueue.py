"""Split virtqueues: well-formed chains, and every malformed one refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt.arch.x86_64 import layout
from altovirt.devices.virtio import barrier
from altovirt.devices.virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, Queue, QueueError
from altovirt.memory import GuestMemory, GuestMemoryError, Region

from .virtq import F_INDIRECT, F_NEXT, F_WRITE, DriverQueue

RING = 0x100000
BUF = 0x200000
FEATURES = 1 << VIRTIO_F_INDIRECT_DESC


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_regions(128 << 20))
    yield m
    m.close()


def make(mem: GuestMemory, size: int = 8, features: int = FEATURES) -> tuple[Queue, DriverQueue]:
    drv = DriverQueue(mem, RING, size)
    q = Queue(256, mem)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, drv.desc, drv.avail, drv.used
    q.activate(features)
    return q, drv


def test_chain_views_are_guest_ram(mem: GuestMemory) -> None:
    q, drv = make(mem)
    mem.write(BUF, b"request!")
    drv.publish(drv.chain([(BUF, 8, False), (BUF + 0x1000, 4, True)]))
    chain = q.pop()
    assert chain is not None and q.pop() is None
    assert chain.read_all() == b"request!" and chain.writable_len == 4
    chain.writable[0][:] = b"done"                      # written straight into guest RAM
    assert mem.read(BUF + 0x1000, 4) == b"done"
    q.add_used(chain, 4)
    assert drv.used_idx() == 1 and drv.used_elem(0) == (chain.head, 4)


def test_only_used_writable_buffers_are_noted_as_written(mem: GuestMemory) -> None:
    """While writes are tracked, a chain's device-writable buffers are noted when it is used
    (not when it is taken), across page boundaries and through an indirect table; its
    device-readable buffers never are."""
    q, drv = make(mem)
    table = 0x300000
    drv.write_desc(0, BUF + 0x3000, 0x1800, F_WRITE | F_NEXT, 1, table=table)
    drv.write_desc(1, BUF + 0x6000, 1, F_WRITE, table=table)
    drv.publish(drv.chain([(BUF, 16, False), (BUF + 0x1ff0, 0x20, True)]))
    drv.write_desc(2, table, 32, F_INDIRECT)
    drv.publish(2)
    mem.track_writes(True)
    try:
        mem.take_written()                      # the driver's own writes above are not ours
        chains = [q.pop(), q.pop()]
        assert not any(mem.take_written())      # taken, not yet written
        for chain in chains:
            assert chain is not None
            q.add_used(chain, 1)
        pages = mem.take_written()
        assert [i for i, b in enumerate(pages) if b] == [p >> 12 for p in (
            BUF + 0x1000, BUF + 0x2000, BUF + 0x3000, BUF + 0x4000, BUF + 0x6000)]
    finally:
        mem.track_writes(False)


def test_indirect_chain(mem: GuestMemory) -> None:
    q, drv = make(mem)
    table = 0x300000
    drv.write_desc(0, BUF, 3, F_NEXT, 1, table=table)
    drv.write_desc(1, BUF + 16, 5, F_WRITE, 0, table=table)
    drv.write_desc(0, table, 32, F_INDIRECT)
    drv.publish(0)
    chain = q.pop()
    assert chain is not None and [len(v) for v in chain.readable + chain.writable] == [3, 5]


# Two regions with a hole between them, for tables whose buffers straddle it.
HOLED = [Region(0, 16 << 20, 0), Region(32 << 20, 16 << 20, 16 << 20)]
TABLE = 0x300000
_ADDRS = st.one_of(st.integers(0, 48 << 20), st.sampled_from([BUF, (16 << 20) - 4096, 32 << 20,
                                                              (48 << 20) - 4096, 1 << 63]))
_LENGTHS = st.sampled_from([0, 1, 16, 4096, 4097, 1 << 20, 0xFFFFFFFF])


@st.composite
def _tables(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """Indirect tables: mostly as Linux writes them (in order, readable first), the rest anything."""
    n = draw(st.integers(1, 20))          # either side of BULK_TABLE
    if draw(st.booleans()):
        writable = draw(st.integers(0, n))
        flags = [(F_WRITE if i >= n - writable else 0) | F_NEXT for i in range(n)]
        flags[-1] &= ~F_NEXT
        return [(draw(_ADDRS), draw(_LENGTHS), f, i + 1) for i, f in enumerate(flags)]
    return [(draw(_ADDRS), draw(_LENGTHS), draw(st.sampled_from([0, F_NEXT, F_WRITE, F_NEXT | F_WRITE,
                                                                 F_INDIRECT, 0xFFFF])),
             draw(st.integers(0, n))) for _ in range(n)]


def _expected(mem: GuestMemory, table: list[tuple[int, int, int, int]]) -> tuple[list, list] | str:
    """The chain an indirect table makes by 2.7.5.3 and 2.7.4.2, as (addr, len) lists; or what is wrong."""
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    i = 0
    for _ in table:
        addr, length, flags, nxt = table[i]
        if flags & F_INDIRECT:
            return "inside an indirect table"
        try:
            mem.view(addr, length)
        except GuestMemoryError:
            return "outside guest RAM"
        if flags & F_WRITE:
            writable.append((addr, length))
        elif writable:
            return "device-readable descriptor after a device-writable one"
        else:
            readable.append((addr, length))
        if not flags & F_NEXT:
            return readable, writable
        if nxt >= len(table):
            return "out of range"
        i = nxt
    return "loops"


@settings(max_examples=400, deadline=None)
@given(_tables())
def test_indirect_tables_by_the_rules(table: list[tuple[int, int, int, int]]) -> None:
    """Whatever a table holds, the chain is what the rules make of it (Linux's tables are
    taken in bulk, any other one descriptor by descriptor: both must agree), or refused."""
    mem = GuestMemory(HOLED)
    try:
        q, drv = make(mem, size=32)
        for i, (addr, length, flags, nxt) in enumerate(table):
            drv.write_desc(i, addr, length, flags, nxt, table=TABLE)
        drv.write_desc(0, TABLE, 16 * len(table), F_INDIRECT)
        drv.publish(0)
        expected = _expected(mem, table)
        if isinstance(expected, str):
            with pytest.raises(QueueError, match=expected):
                q.pop()
            return
        chain = q.pop()
        assert chain is not None
        for views, spans in ((chain.readable, expected[0]), (chain.writable, expected[1])):
            assert [len(v) for v in views] == [length for _, length in spans]
            for v, (addr, length) in zip(views, spans, strict=True):
                if length:      # the very bytes of guest RAM at addr
                    v[0] ^= 0xFF
                    assert mem.read(addr, 1) == bytes([v[0]])
        assert chain.spans == expected[1]
    finally:
        mem.close()


def test_an_iovec_keeps_guest_ram_mapped() -> None:
    """Buffers handed to the kernel by address keep RAM mapped until they are dropped, as
    views do: a request still in flight when the VM closes cannot touch unmapped memory."""
    mem = GuestMemory(layout.ram_regions(16 << 20))
    mem.write(BUF, b"kept")
    iov = mem.iovec([BUF], [4])
    mem.close()
    assert iov.tobytes() == b"kept"


def test_ring_wraps_past_65535(mem: GuestMemory) -> None:
    q, drv = make(mem, size=4)
    for _ in range(70000):
        drv.publish(drv.chain([(BUF, 1, True)]))
        chain = q.pop()
        assert chain is not None
        q.add_used(chain, 1)
    assert drv.used_idx() == 70000 & 0xFFFF


@pytest.mark.parametrize("setup, message", [
    (lambda d: d.write_desc(0, BUF, 1, F_NEXT, 99), "descriptor index 99 out of range"),
    (lambda d: (d.write_desc(0, BUF, 1, F_NEXT, 1), d.write_desc(1, BUF, 1, F_NEXT, 0)), "loops"),
    (lambda d: d.write_desc(0, 200 << 20, 16, 0), "buffer outside guest RAM"),
    (lambda d: d.write_desc(0, (128 << 20) - 8, 16, 0), "buffer outside guest RAM"),
    (lambda d: d.write_desc(0, 0xFFFFFFFFFFFFFFF0, 32, 0), "buffer outside guest RAM"),
    (lambda d: (d.write_desc(0, BUF, 1, F_WRITE | F_NEXT, 1), d.write_desc(1, BUF, 1, 0)),
     "device-readable descriptor after a device-writable one"),
    (lambda d: d.write_desc(0, 0x300000, 24, F_INDIRECT), "not a multiple of 16"),
    (lambda d: d.write_desc(0, 0x300000, 0, F_INDIRECT), "not a multiple of 16"),
    (lambda d: d.write_desc(0, 0x300000, 16, F_INDIRECT | F_NEXT, 1), "indirect descriptor with NEXT"),
    (lambda d: d.write_desc(0, 200 << 20, 16, F_INDIRECT), "indirect table outside guest RAM"),
    (lambda d: (d.write_desc(0, 0x300000, 16, F_INDIRECT),
                d.write_desc(0, 0x300000, 16, F_INDIRECT, table=0x300000)), "inside an indirect table"),
    (lambda d: (d.write_desc(0, 0x300000, 32, F_INDIRECT),
                d.write_desc(0, BUF, 1, F_NEXT, 1, table=0x300000),
                d.write_desc(1, BUF, 1, F_NEXT, 0, table=0x300000)), "loops"),
])
def test_malformed_chains(mem: GuestMemory, setup: object, message: str) -> None:
    q, drv = make(mem)
    setup(drv)  # type: ignore[operator]
    drv.publish(0)
    with pytest.raises(QueueError, match=message):
        q.pop()


def test_indirect_needs_the_feature(mem: GuestMemory) -> None:
    q, drv = make(mem, features=0)
    drv.write_desc(0, 0x300000, 16, F_INDIRECT)
    drv.publish(0)
    with pytest.raises(QueueError, match="without VIRTIO_F_INDIRECT_DESC"):
        q.pop()


def test_avail_index_running_ahead(mem: GuestMemory) -> None:
    q, drv = make(mem, size=8)
    drv.avail_idx = 9
    drv.publish(0)
    with pytest.raises(QueueError, match="more than 8 ahead"):
        q.pop()


@pytest.mark.parametrize("size, desc, message", [
    (6, RING, "not a power of 2"), (512, RING, "not a power of 2"), (0, RING, "not a power of 2"),
    (8, RING + 8, "misaligned"), (8, 0xC0000000, "ring outside guest RAM"),
])
def test_bad_ring_layouts(mem: GuestMemory, size: int, desc: int, message: str) -> None:
    q = Queue(256, mem)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, desc, RING + 0x1000, RING + 0x2000
    with pytest.raises(QueueError, match=message):
        q.activate(0)


def test_interrupt_suppression_without_event_idx(mem: GuestMemory) -> None:
    q, drv = make(mem)
    drv.publish(drv.chain([(BUF, 1, True)]))
    chain = q.pop()
    assert chain is not None
    q.add_used(chain, 1)
    assert q.needs_interrupt()
    drv.set_avail_flags(1)                              # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.needs_interrupt()


def test_event_idx(mem: GuestMemory) -> None:
    q, drv = make(mem, features=FEATURES | 1 << VIRTIO_F_EVENT_IDX)
    for _ in range(3):
        drv.publish(drv.chain([(BUF, 1, True)]))
    drv.set_used_event(1)                               # interrupt once used passes entry 1
    # The first is always sent (nothing signalled yet to compare with), then only past entry 1.
    for expected in (True, True, False, False):
        chain = q.pop()
        if chain is None:
            assert not expected
            break
        q.add_used(chain, 1)
        assert q.needs_interrupt() == expected, drv.used_idx()
    assert drv.avail_event() == 3                       # the device asks for the next new buffer


def test_pop_many_is_pop_that_many_times(mem: GuestMemory) -> None:
    """In order, up to the limit, avail_event asking for the next new buffer; a malformed
    chain raises, those before it popped (as one pop at a time)."""
    q, drv = make(mem, features=FEATURES | 1 << VIRTIO_F_EVENT_IDX)
    heads = [drv.chain([(BUF + 0x1000 * i, 0x1000, True)]) for i in range(5)]
    for head in heads:
        drv.publish(head)
    chains = q.pop_many(3)
    assert [c.head for c in chains] == heads[:3] and drv.avail_event() == 3
    assert all(c.writable_len == 0x1000 and c.spans for c in chains)
    assert [c.head for c in q.pop_many(16)] == heads[3:] and q.pop_many(16) == [] and drv.avail_event() == 5
    drv.publish(drv.chain([(BUF, 16, True)]))
    drv.write_desc(drv.next_desc, 1 << 40, 16, 2)     # the next one's buffer is not RAM
    drv.publish(drv.next_desc)
    with pytest.raises(QueueError, match="buffer outside guest RAM"):
        q.pop_many(4)
    assert q.next_avail == 7


@pytest.mark.parametrize("event_idx", [True, False])
def test_device_turns_notifications_off_while_busy(mem: GuestMemory, event_idx: bool) -> None:
    """What a driver checks before notifying (2.7.10 avail_event, or 2.7.7 the used ring's
    NO_NOTIFY flag) says "don't" while the device works the queue, and asks for the next new
    buffer once it is done."""
    q, drv = make(mem, features=FEATURES | (1 << VIRTIO_F_EVENT_IDX if event_idx else 0))

    def driver_would_notify(new_idx: int) -> bool:
        # Linux's virtqueue_kick_prepare: vring_need_event(), or the flag.
        if event_idx:
            return (new_idx - drv.avail_event() - 1) & 0xFFFF < 1
        return not drv.mem.read(drv.used, 2)[0] & 1

    drv.publish(drv.chain([(BUF, 1, False)]))
    q.notifications(False)
    assert q.pop() is not None
    drv.publish(drv.chain([(BUF, 1, False)]))         # added while the device is busy
    assert not driver_would_notify(drv.avail_idx)
    q.notifications(True)
    assert q.has_available()                            # so the device must look again
    assert q.pop() is not None and q.pop() is None
    drv.publish(drv.chain([(BUF, 1, False)]))
    assert driver_would_notify(drv.avail_idx)


# A driver on another CPU, reading the used ring's index and avail_event as a guest's vCPU does
# while the device writes them: it prints how often a value went back (a store the device did
# not mean: a torn or zeroed field).
_READER = r"""
import ctypes, mmap, sys
fd, size, used, qsize, flag = map(int, sys.argv[1:])
m = mmap.mmap(fd, size)
idx = ctypes.c_uint16.from_buffer(m, used + 2)
event = ctypes.c_uint16.from_buffer(m, used + 4 + 8 * qsize)
state = ctypes.c_uint8.from_buffer(m, flag)
state.value = 1                     # reading
last_idx = last_event = reads = back = 0
while state.value == 1 or reads < 1000:
    i, e = idx.value, event.value
    back += i < last_idx or e < last_event
    last_idx, last_event = max(i, last_idx), max(e, last_event)
    reads += 1
print(reads, back)
del idx, event, state
m.close()
"""


def test_driver_never_sees_a_used_index_the_device_did_not_publish() -> None:
    """The used index and avail_event go up, and a driver reading them meanwhile from
    another CPU never sees them go back: each is written with one store, not cleared and
    then written (struct.pack_into's way), which showed a Linux guest a used index of 0
    and made it take an old element for a new one ("id N is not a head!")."""
    mem = GuestMemory(layout.ram_regions(128 << 20), shared=True)
    reader = None
    try:
        assert mem.fd is not None
        q, drv = make(mem, size=256, features=FEATURES | 1 << VIRTIO_F_EVENT_IDX)
        flag = 0x400000
        reader = subprocess.Popen([sys.executable, "-c", _READER, str(mem.fd), str(mem.size), str(drv.used),
                                   "256", str(flag)], pass_fds=[mem.fd], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while mem.read(flag, 1) != b"\x01":
            assert reader.poll() is None and time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.01)
        head = drv.chain([(BUF, 64, True)])
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            if q.next_used < 60000:         # short of the index wrapping at 65536
                drv.publish(head)
                chain = q.pop()
                assert chain is not None
                q.add_used(chain, 64)
            q.notifications(True)           # avail_event written again, unchanged
        mem.write(flag, b"\x02")
        out, _ = reader.communicate(timeout=60)
        reads, back = map(int, out.split())
        assert back == 0, f"the driver saw an index go back {back} times in {reads} reads"
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        mem.close()


def test_barriers_are_the_machines_own() -> None:
    """Barriers are instructions on a mapped code page (not the lock fallback, which is short
    of one on arm64), and run: x86's MFENCE for the full one, its other orders kept anyway."""
    assert barrier.mb is not barrier._locked
    for fence in (barrier.mb, barrier.wmb, barrier.rmb):
        fence()
    assert (barrier.wmb is barrier._nothing) == (os.uname().machine == "x86_64")
