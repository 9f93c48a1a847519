"""Saved state: virtqueues, the virtio-mmio transport and the legacy devices round-trip
through the JSON envelope, carry on where they stood, and refuse state that does not fit,
changing nothing."""

from __future__ import annotations

import contextlib
import ctypes as C
import dataclasses
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt import persist
from altovirt.arch.x86_64 import layout, poweron
from altovirt.backends.blockfile import BlockFile
from altovirt.backends.unix import UnixListener
from altovirt.config import load_config
from altovirt.devices.legacy.i8042 import CMD_RESET_CPU, CMD_SELF_TEST, I8042
from altovirt.devices.legacy.i8042 import MAX_OUTPUT as I8042_MAX_OUTPUT
from altovirt.devices.legacy.persist import I8042State, RtcState, SerialState
from altovirt.devices.legacy.rtc import Rtc
from altovirt.devices.legacy.serial import Serial
from altovirt.devices.virtio import mmio, vsock
from altovirt.devices.virtio.block import Block, WorkerPool
from altovirt.devices.virtio.device import COMMON_FEATURES, VIRTIO_F_VERSION_1, Interrupt
from altovirt.devices.virtio.mmio import MmioTransport
from altovirt.devices.virtio.persist import QueueState, TransportState
from altovirt.devices.virtio.queue import Queue
from altovirt.devices.virtio.rng import Rng
from altovirt.eventloop import EventLoop
from altovirt.kvm import structs as S
from altovirt.memory import GuestMemory
from altovirt.persist import SavedStateError
from altovirt.vmm import builder
from altovirt.vmm.hotplug import Hotplug
from altovirt.vmm.machine import Machine
from altovirt.vmm.persist import BlockNodeState, HotplugState, NicSlotState
from altovirt.vmm.virtio_devices import empty_disk, empty_nic

from .conftest import needs_kvm
from .virtq import DriverQueue

T = TypeVar("T")
MEM = GuestMemory(layout.ram_regions(128 << 20))
RING = 0x100000
BUFFERS = 0x200000


def through_json(state: object) -> bytes:
    return persist.seal("altovirt-test", 1, persist.to_json(state))


def from_json_image(cls: type[T], data: bytes) -> T:
    return persist.from_json(cls, persist.unseal(data, "altovirt-test", 1, "a test image"), "state")


def driven_queue(size: int, features: int, posted: int, popped: int) -> tuple[Queue, DriverQueue]:
    """A queue the driver set up with ``posted`` one-buffer chains, of which the device took
    and completed ``popped``."""
    driver = DriverQueue(MEM, RING, size)
    q = Queue(256, MEM)
    q.size, q.ready = size, True
    q.desc_addr, q.avail_addr, q.used_addr = driver.desc, driver.avail, driver.used
    q.activate(features)
    for i in range(posted):
        driver.publish(driver.chain([(BUFFERS + 0x1000 * (i % size), 64, True)]))
    for _ in range(popped):
        chain = q.pop()
        assert chain is not None
        q.add_used(chain, 8)
    if popped:
        q.needs_interrupt()
    return q, driver


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([1, 2, 8, 64, 256]), event_idx=st.booleans(), indirect=st.booleans(),
       data=st.data())
def test_queue_round_trip(size: int, event_idx: bool, indirect: bool, data: st.DataObject) -> None:
    features = 1 << VIRTIO_F_VERSION_1 | event_idx << 29 | indirect << 28
    posted = data.draw(st.integers(0, size))
    popped = data.draw(st.integers(0, posted))
    q, _ = driven_queue(size, features, posted, popped)
    saved = q.save()
    copy = Queue(256, MEM)
    copy.restore(from_json_image(QueueState, through_json(saved)))
    assert copy.save() == saved
    a, b = q.pop(), copy.pop()            # both carry on with the same next chain
    assert (a and (a.head, bytes(a.writable[0]))) == (b and (b.head, bytes(b.writable[0])))


def test_inactive_queue_keeps_what_the_driver_wrote() -> None:
    q = Queue(256, MEM)
    q.size, q.desc_addr = 1000, 0x1234      # not valid yet: checked only at activation
    copy = Queue(256, MEM)
    copy.restore(q.save())
    assert copy.save() == q.save()


@pytest.mark.parametrize("change, problem", [
    ({"max_size": 128}, "a queue of at most 128 entries cannot restore one of 256"),
    ({"next_avail": 1 << 16}, "next_avail must be an integer from 0 to 65535"),
    ({"signalled_used": -2}, "signalled_used must be an integer from -1 to 65535"),
    ({"used_addr": RING + 2}, "misaligned ring address"),
    ({"desc_addr": 0xF000_0000}, "ring outside guest RAM"),
    ({"size": 3}, "queue size 3 is not a power of 2"),
    ({"ready": False}, "an active queue must be ready"),
])
def test_bad_queue_state_changes_nothing(change: dict[str, object], problem: str) -> None:
    q, _ = driven_queue(8, COMMON_FEATURES, 5, 2)
    fields: dict[str, Any] = {**persist.to_json(q.save()), **change}
    bad = QueueState(**fields)
    target, _ = driven_queue(8, COMMON_FEATURES, 3, 1)
    before = target.save()
    with pytest.raises(SavedStateError, match=problem):
        target.restore(bad)
    assert target.save() == before


def test_bad_images_are_refused() -> None:
    with pytest.raises(SavedStateError, match="not a test image"):
        persist.unseal(b'{"format": "other", "version": 1}', "altovirt-test", 1, "a test image")
    with pytest.raises(SavedStateError, match="a test image version 2; this VMM reads version 1"):
        persist.unseal(b'{"format": "altovirt-test", "version": 2}', "altovirt-test", 1, "a test image")
    fields = persist.to_json(Queue(256, MEM).save())
    with pytest.raises(SavedStateError, match=r"state.ready must be true or false"):
        persist.from_json(QueueState, {**fields, "ready": 1}, "state")
    with pytest.raises(SavedStateError, match="state must have the fields"):
        persist.from_json(QueueState, {**fields, "extra": 1}, "state")


@dataclasses.dataclass(frozen=True)
class Grown:
    """A state that gained a field (with a default) after some were saved."""

    first: int
    added: tuple[int, ...] = ()


def test_a_field_added_later_may_be_missing() -> None:
    assert persist.from_json(Grown, {"first": 1}, "state") == Grown(1)
    assert persist.from_json(Grown, {"first": 1, "added": [2]}, "state") == Grown(1, (2,))
    with pytest.raises(SavedStateError, match="state must have the fields"):
        persist.from_json(Grown, {"added": []}, "state")


@dataclasses.dataclass(frozen=True)
class Registers:
    ids: tuple[int, ...]
    values: tuple[bytes, ...]


def test_a_bad_item_of_a_long_list_is_named() -> None:
    """Long lists are read whole; one bad item is still named by its place."""
    good = persist.to_json(Registers(tuple(range(300)), (b"\1" * 8,) * 300))
    assert persist.from_json(Registers, good, "vcpu") == Registers(tuple(range(300)), (b"\1" * 8,) * 300)
    for field, item, problem in (("ids", True, r"vcpu.ids\[7\] must be an integer"),
                                 ("ids", "7", r"vcpu.ids\[7\] must be an integer"),
                                 ("values", "AA=A", r"vcpu.values\[7\] must be base64 text"),
                                 ("values", 7, r"vcpu.values\[7\] must be base64 text")):
        bad = list(good[field])
        bad[7] = item
        with pytest.raises(SavedStateError, match=problem):
            persist.from_json(Registers, {**good, field: bad}, "vcpu")


# --- the transport, with an entropy device behind it ---

@pytest.fixture
def slot() -> Iterator[tuple[MmioTransport, int]]:
    io = EventLoop()
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    transport = MmioTransport(Rng("rng0"), MEM, irqfd, io)
    yield transport, irqfd
    transport.close()
    io.stop()
    os.close(irqfd)


def start_driver(t: MmioTransport, driver: DriverQueue) -> None:
    """What Linux's virtio_mmio does up to DRIVER_OK, through the registers."""
    t.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
    t.write(mmio.DRIVER_FEATURES_SEL, 4, 1)
    t.write(mmio.DRIVER_FEATURES, 4, 1 << (VIRTIO_F_VERSION_1 - 32))
    t.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    t.write(mmio.QUEUE_SEL, 4, 0)
    t.write(mmio.QUEUE_NUM, 4, driver.size)
    for reg, addr in ((mmio.QUEUE_DESC_LOW, driver.desc), (mmio.QUEUE_DRIVER_LOW, driver.avail),
                      (mmio.QUEUE_DEVICE_LOW, driver.used)):
        t.write(reg, 4, addr)
    t.write(mmio.QUEUE_READY, 4, 1)
    t.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)


def request_entropy(t: MmioTransport, driver: DriverQueue, n: int) -> bytes:
    head = driver.chain([(BUFFERS + 0x1000 * n, 32, True)])
    driver.publish(head)
    t.device.queue_notify(0)
    assert driver.used_idx() == n + 1
    used_head, length = driver.used_elem(n)
    assert (used_head, length) == (head, 32)
    return MEM.read(BUFFERS + 0x1000 * n, 32)


def test_transport_round_trip_carries_on(slot: tuple[MmioTransport, int]) -> None:
    t, _ = slot
    driver = DriverQueue(MEM, RING, 16)
    start_driver(t, driver)
    request_entropy(t, driver, 0)
    saved = t.save()
    io = EventLoop()
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    copy = MmioTransport(Rng("rng0"), MEM, irqfd, io)
    try:
        copy.restore(from_json_image(TransportState, through_json(saved)))
        assert copy.save() == saved
        registers = (mmio.STATUS, mmio.QUEUE_READY, mmio.QUEUE_NUM, mmio.INTERRUPT_STATUS,
                     mmio.CONFIG_GENERATION)
        assert [copy.read(r, 4) for r in registers] == [t.read(r, 4) for r in registers]
        assert copy.read(mmio.STATUS, 4) & mmio.DRIVER_OK
        # The restored device serves the next request in the ring where the first left off.
        assert request_entropy(copy, driver, 1) != bytes(32)
        assert struct.unpack("<Q", os.read(irqfd, 8))[0] >= 1     # it interrupts the guest
    finally:
        copy.close()
        io.stop()
        os.close(irqfd)


@pytest.mark.parametrize("change, problem", [
    ({"device_id": 2}, "a slot of device 2 cannot restore rng0's"),
    ({"config": b"\x01"}, "rng0's configuration space .* is not the saved one"),
    ({"queues": ()}, "0 queues saved; rng0 has 1"),
    ({"status": 0x100}, "status must be an integer from 0 to 255"),
    ({"driver_features": 1 << 40}, "were never offered by rng0"),
])
def test_bad_transport_state_changes_nothing(slot: tuple[MmioTransport, int], change: dict[str, object],
                                             problem: str) -> None:
    t, _ = slot
    driver = DriverQueue(MEM, RING, 16)
    start_driver(t, driver)
    good = t.save()
    bad = TransportState(**{**{f: getattr(good, f) for f in good.__dataclass_fields__}, **change})
    with pytest.raises(SavedStateError, match=problem):
        t.restore(bad)
    assert t.save() == good
    assert json.loads(through_json(good))["format"] == "altovirt-test"


# --- the legacy devices, driven by random guest writes ---

def uart() -> Serial:
    return Serial(None, lambda: None)


def keyboard() -> I8042:
    return I8042(lambda: None)


def rtc() -> Rtc:
    return Rtc(128 << 20, 0)


writes = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 0xFF)), max_size=40)


@settings(max_examples=80, deadline=None)
@given(ops=writes, typed=st.binary(max_size=64))
@pytest.mark.parametrize("make, cls, ports", [
    (uart, SerialState, 8), (keyboard, I8042State, 5), (rtc, RtcState, 2)])
def test_legacy_round_trip(make: Callable[[], Any], cls: type, ports: int, ops: list[tuple[int, int]],
                           typed: bytes) -> None:
    device = make()
    if isinstance(device, Serial):
        device.enqueue(typed)
    for offset, value in ops:
        if offset < ports and not (isinstance(device, I8042) and value == CMD_RESET_CPU):
            device.write(offset % ports, 1, value)
    saved = device.save()
    copy = make()
    copy.restore(from_json_image(cls, through_json(saved)))
    assert copy.save() == saved
    readable = [o for o in range(ports) if not isinstance(device, Rtc) or o == 0]
    assert [copy.read(o, 1) for o in readable] == [device.read(o, 1) for o in readable]


@pytest.mark.parametrize("make, change, problem", [
    (uart, {"ier": 0x10}, "ier must be an integer from 0 to 15"),
    (uart, {"rx": bytes(5000)}, "rx holds more than 4096 bytes"),
    (keyboard, {"pending_cmd": 0xAA}, "pending command 170 takes no data"),
    (keyboard, {"out": bytes(17)}, "more than 16 bytes waiting"),
    (rtc, {"index": 0x80}, "index must be an integer from 0 to 127"),
    (rtc, {"cmos": bytes(64)}, "the CMOS must be 128 bytes"),
])
def test_bad_legacy_state_changes_nothing(make: Callable[[], Any], change: dict[str, object],
                                          problem: str) -> None:
    device = make()
    good = device.save()
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    with pytest.raises(SavedStateError, match=problem):
        device.restore(type(good)(**{**fields, **change}))
    assert device.save() == good


def test_i8042_answers_are_bounded() -> None:
    """A guest sending commands without reading the answers cannot grow the VMM's memory."""
    kbd = keyboard()
    for _ in range(10_000):
        kbd.write(4, 1, CMD_SELF_TEST)
    assert len(kbd.save().out) == I8042_MAX_OUTPUT
    assert kbd.read(0, 1) == 0x55


# --- what KVM holds: vCPUs, interrupt controllers, PIT, clock ---

@pytest.fixture
def built(probe: Path) -> Iterator[Machine]:
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-smp", "2"]))
    yield m
    m.close()


def kvm_state(m: Machine) -> poweron.PowerOnState:
    assert m.vm is not None
    return poweron.save(m.vm, [v.vcpu for v in m.vcpus], [])


def without_clock(state: poweron.PowerOnState) -> poweron.PowerOnState:
    """Without what moves with time: the kvmclock, and when each PIT channel was loaded
    (count_load_time, which KVM sets to "now" when the state is set)."""
    pit = bytearray(state.vm.pit)
    for channel in range(3):
        at = channel * C.sizeof(S.kvm_pit_channel_state) + S.offsetof(S.kvm_pit_channel_state,
                                                                       "count_load_time")
        pit[at:at + 8] = bytes(8)
    return dataclasses.replace(state, vm=dataclasses.replace(state.vm, clock=0, pit=bytes(pit)))


@needs_kvm
def test_kvm_state_round_trip(built: Machine) -> None:
    assert built.vm is not None
    saved = kvm_state(built)
    # Something else in the meantime: the registers of vCPU 1 changed.
    regs = built.vcpus[1].vcpu.get_regs()
    regs.rax = 0x1234
    built.vcpus[1].vcpu.set_regs(regs)
    assert without_clock(kvm_state(built)) != without_clock(saved)
    poweron.restore(built.vm, [v.vcpu for v in built.vcpus],
                    from_json_image(poweron.PowerOnState, through_json(saved)))
    after = kvm_state(built)
    assert without_clock(after) == without_clock(saved)
    assert saved.vm.clock <= after.vm.clock < saved.vm.clock + 10**9       # ns; it runs on from there


@needs_kvm
@pytest.mark.parametrize("change, problem", [
    (lambda s: dataclasses.replace(s, vcpus=s.vcpus[:1]), "1 vCPUs saved; this VM has 2"),
    (lambda s: dataclasses.replace(s, vcpus=(dataclasses.replace(s.vcpus[0], regs=b"\0" * 8),
                                             s.vcpus[1])), "vCPU 0 regs must be 144 bytes"),
    (lambda s: dataclasses.replace(s, vcpus=(s.vcpus[0], dataclasses.replace(s.vcpus[1], mp_state=11))),
     "vCPU 1 mp_state must be an integer from 0 to 10"),
    (lambda s: dataclasses.replace(s, vm=dataclasses.replace(s.vm, irqchips=s.vm.irqchips[:2])),
     "3 interrupt controllers are saved"),
])
def test_bad_kvm_state_sets_nothing(built: Machine, change: Callable[[Any], Any], problem: str) -> None:
    assert built.vm is not None
    saved = kvm_state(built)
    regs = built.vcpus[0].vcpu.get_regs()
    regs.rbx = 0x5678                       # differs from the saved state: a partial restore shows
    built.vcpus[0].vcpu.set_regs(regs)
    before = without_clock(kvm_state(built))
    with pytest.raises(SavedStateError, match=problem):
        poweron.restore(built.vm, [v.vcpu for v in built.vcpus], change(saved))
    assert without_clock(kvm_state(built)) == before


# --- what devices do before their rings are saved ---

@dataclasses.dataclass
class VsockLink:
    """A vsock device with one guest connection to a host service: its host end ``peer``,
    the guest's event queue ``events`` with one buffer at :data:`EVENT_BUFFER`, and the
    interrupt's eventfd (read empty)."""

    device: vsock.Vsock
    peer: socket.socket
    events: DriverQueue
    irqfd: int


EVENT_BUFFER = BUFFERS + 0x2000


@pytest.fixture
def vsock_link(tmp_path: Path) -> Iterator[VsockLink]:
    io = EventLoop()
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    uds = str(tmp_path / "v.sock")
    device = vsock.Vsock("vsock0", 3, UnixListener(uds), io)
    try:
        drivers = [DriverQueue(MEM, RING + 0x10000 * i, 16) for i in range(3)]
        queues = []
        for d in drivers:
            q = Queue(256, MEM)
            q.size, q.ready, q.desc_addr, q.avail_addr, q.used_addr = 16, True, d.desc, d.avail, d.used
            q.activate(1 << VIRTIO_F_VERSION_1)
            queues.append(q)
        device.features = 1 << VIRTIO_F_VERSION_1
        device.activate(MEM, queues, Interrupt(irqfd, lambda why: None), io)
        rx, tx, events = drivers
        with socket.socket(socket.AF_UNIX) as service:
            service.bind(f"{uds}_5000")
            service.listen()
            # The guest connects to host port 5000 and gets its RESPONSE.
            request = vsock._HDR.pack(3, vsock.VMADDR_CID_HOST, 1234, 5000, 0, vsock.VIRTIO_VSOCK_TYPE_STREAM,
                                      vsock.OP_REQUEST, 0, 65536, 0)
            MEM.write(BUFFERS, request)
            tx.publish(tx.chain([(BUFFERS, len(request), False)]))
            rx.publish(rx.chain([(BUFFERS + 0x1000, 4096, True)]))
            device.queue_notify(vsock.TXQ)
            peer, _ = service.accept()
        with peer:
            peer.settimeout(5)
            assert rx.used_idx() == 1
            assert vsock._HDR.unpack(MEM.read(BUFFERS + 0x1000, vsock.HDR_SIZE))[6] == vsock.OP_RESPONSE
            MEM.write(EVENT_BUFFER, b"\xff" * 4)
            events.publish(events.chain([(EVENT_BUFFER, 4, True)]))
            os.eventfd_read(irqfd)
            yield VsockLink(device, peer, events, irqfd)
    finally:
        device.close()
        io.stop()
        os.close(irqfd)


def transport_reset_told(link: VsockLink) -> bool:
    """Whether the guest found a transport reset event in its buffer, and was interrupted."""
    return (link.events.used_idx() == 1 and link.events.used_elem(0)[1] == 4
            and MEM.read(EVENT_BUFFER, 4) == struct.pack("<I", vsock.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            and os.eventfd_read(link.irqfd) == 1)


def test_saving_vsock_resets_its_transport(vsock_link: VsockLink) -> None:
    """Connections cannot move with a snapshot: saving ends them on the host and leaves a
    transport reset event for the guest in the saved rings, as Firecracker does."""
    vsock_link.device.prepare_save()
    assert vsock_link.peer.recv(1) == b""                   # the host side is closed
    assert transport_reset_told(vsock_link)


def test_a_forked_guest_hears_a_transport_reset(vsock_link: VsockLink) -> None:
    """A fork's child (vmm/fork.py) tells its guest its connections are gone; the host side,
    which stays with the parent, is not touched."""
    vsock_link.device.connections_lost()
    assert transport_reset_told(vsock_link)
    vsock_link.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        vsock_link.peer.recv(1)                             # still open, nothing sent


def test_one_protocol_for_saved_state(slot: tuple[MmioTransport, int]) -> None:
    """Every component saves and restores the same way (mypy checks the signatures)."""
    parts: list[persist.Persistent[Any]] = [Queue(256, MEM), slot[0], uart(), keyboard(), rtc()]
    for part in parts:
        state = part.save()
        part.restore(state)
        assert part.save() == state


# --- the hot-plug slots ---

@pytest.fixture
def slots_factory() -> Iterator[Callable[[], Hotplug]]:
    """VMs' hot-plug slots (2 disks, 1 NIC, all empty), as the builder makes them."""
    io, pool = EventLoop(), WorkerPool()
    made: list[tuple[Hotplug, list[int]]] = []

    def make() -> Hotplug:
        fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        disks = [MmioTransport(empty_disk(i, pool), MEM, fds[i], io) for i in range(2)]
        nics = [MmioTransport(empty_nic(0, io), MEM, fds[2], io)]
        hotplug = Hotplug(disks, nics, io, pool, contextlib.nullcontext, lambda name: None)
        made.append((hotplug, fds))
        return hotplug

    yield make
    for hotplug, fds in made:
        for t in (*hotplug.disks, *hotplug.nics):
            t.close()
        hotplug.close()
        for fd in fds:
            os.close(fd)
    pool.stop()
    io.stop()


def test_hotplug_round_trip(slots_factory: Callable[[], Hotplug], tmp_path: Path) -> None:
    """A disk plugged into the second slot, a spare node and the empty NIC slot's MAC come back
    in another VM with the same slots."""
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    source = slots_factory()
    source.add_blockdev("hp", str(tmp_path / "a"), read_only=False, direct=False)
    source.add_blockdev("spare", str(tmp_path / "b"), read_only=True, direct=False)
    source.add_disk("hp", 1, serial="s1")
    saved = source.save()
    source.del_device("hp")                 # the source lets go of its images (they are locked)
    source.del_blockdev("hp")
    source.del_blockdev("spare")
    target = slots_factory()
    target.restore(from_json_image(HotplugState, through_json(saved)))
    assert target.save() == saved
    disk = target.disks[1].device
    assert isinstance(disk, Block) and disk.image is not None
    assert (disk.name, disk.image.path, disk.serial) == ("hp", str(tmp_path / "a"), b"s1")
    assert target.disks[1].read(mmio.CONFIG, 4) == (1 << 20) // 512     # the guest sees its capacity
    assert target.nics[0].device.config == source.nics[0].device.config  # and the slot's MAC
    target.del_device("hp")                                                 # and it unplugs as any
    assert target.save().disks[1].device == ""


@pytest.mark.parametrize("change, problem", [
    (lambda s, p: dataclasses.replace(s, disks=s.disks[:1]),
     "1 disk and 1 NIC slots saved; this VM has 2 and 1"),
    (lambda s, p: dataclasses.replace(s, blockdevs=()), "disk 'hp' has no saved block node"),
    (lambda s, p: dataclasses.replace(s, nics=(NicSlotState("", "52:54:00:zz:00:01"),)),
     "NIC slot 0: invalid MAC"),
    (lambda s, p: dataclasses.replace(s, blockdevs=(BlockNodeState("b", str(p / "b"), False, False),
                                                    BlockNodeState("hp", str(p / "gone"), False, False))),
     "a saved backend cannot be opened: .*gone"),
])
def test_bad_hotplug_state_changes_nothing(slots_factory: Callable[[], Hotplug], tmp_path: Path,
                                           change: Callable[[HotplugState, Path], HotplugState],
                                           problem: str) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    source = slots_factory()
    source.add_blockdev("hp", str(tmp_path / "a"), read_only=False, direct=False)
    source.add_disk("hp", 1)
    target = slots_factory()
    before = target.save()
    with pytest.raises(SavedStateError, match=problem):
        target.restore(change(source.save(), tmp_path))
    assert target.save() == before
    BlockFile(str(tmp_path / "b"), read_only=False, direct=False).close()   # nothing left open
