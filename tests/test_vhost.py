"""vhost-net (``-netdev ...,vhost=on``): its request numbers against the kernel's headers, and
what a user sees on a host without /dev/vhost-net. Linux drives the NIC itself in the test bed
(tests/linux/test_devices.py), where the module is loaded.

The front end's plumbing that vhost-net, vhost-vsock and virtio-fs share (devices/virtio/offload.py)
is driven here through a virtio-mmio slot, against a back end that records what it is asked: what
is handed over at DRIVER_OK and in which order, what is taken back at reset, a refusal, a back end
that goes away, and a refused save."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.backends import vhost
from altovirt.backends.tap import TUN_F_CSUM, Tap
from altovirt.backends.vhost_user import VhostUser
from altovirt.devices.virtio import mmio
from altovirt.devices.virtio.device import COMMON_FEATURES, VIRTIO_F_VERSION_1, VirtioDevice
from altovirt.devices.virtio.device import VIRTIO_MMIO_INT_CONFIG as INT_CONFIG
from altovirt.devices.virtio.device import VIRTIO_MMIO_INT_VRING as INT_VRING
from altovirt.devices.virtio.net import VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF, Net
from altovirt.devices.virtio.queue import VIRTIO_F_INDIRECT_DESC
from altovirt.devices.virtio.vhost_net import VhostNet
from altovirt.devices.virtio.vhost_user_fs import VhostUserFs
from altovirt.devices.virtio.vhost_vsock import VhostVsock
from altovirt.eventloop import EventLoop
from altovirt.memory import GuestMemory
from altovirt.persist import SaveError

from .cabi import c_values, needs_gcc
from .conftest import ProbeReport, altovirt_cmd
from .netns import NetNs, needs_netns

REQUESTS = ("VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_SET_MEM_TABLE",
            "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE", "VHOST_GET_VRING_BASE",
            "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_NET_SET_BACKEND",
            "VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING")


@needs_gcc
def test_request_numbers_and_layouts_match_linux_headers() -> None:
    sizes = ("sizeof(struct vhost_vring_state)", "sizeof(struct vhost_vring_file)",
             "sizeof(struct vhost_vring_addr)", "sizeof(struct vhost_memory)",
             "sizeof(struct vhost_memory_region)")
    got = c_values(("linux/vhost.h",), REQUESTS + sizes)
    assert {n: got[n] for n in REQUESTS} == {n: getattr(vhost, n) for n in REQUESTS}
    assert [got[s] for s in sizes] == [s.size for s in (vhost._VRING_STATE, vhost._VRING_FILE,
                                                        vhost._VRING_ADDR, vhost._MEMORY,
                                                        vhost._MEMORY_REGION)]


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs(("tap0",))
    yield ns
    ns.close()


@needs_netns
@pytest.mark.skipif(os.path.exists(vhost.DEVICE), reason="this host has /dev/vhost-net; "
                    "test_probe_frames_through_vhost runs instead")
def test_without_vhost_net_one_line_and_the_tap_let_go(probe: Path, netns: NetNs) -> None:
    kernel = ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=net", "-serial", "stdio"]
    p = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0,vhost=on"))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("altovirt: error: -netdev id=n0: /dev/vhost-net: No such file or directory "
                        "(load the vhost_net module)\n")
    bad = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0,vhost=maybe"))
    assert bad.returncode == 2 and bad.stderr.startswith("altovirt: error: -netdev vhost: ")
    p = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0"))    # the tap is free again
    assert ProbeReport.parse(p.stdout).tests == {"net": "ok"}, p.stderr


@needs_netns
@pytest.mark.skipif(not os.path.exists(vhost.DEVICE), reason="SKIPPED LOUDLY: no /dev/vhost-net on "
                    "this host (modprobe vhost_net); the Linux test bed still drives a vhost-net NIC")
def test_probe_frames_through_vhost(probe: Path, netns: NetNs) -> None:
    p = netns.run(altovirt_cmd("-kernel", str(probe / "probe.elf"), "-netdev", "id=n0,netdev=tap0,vhost=on",
                               "-append", "probe.run=net,net-big", "-serial", "stdio"))
    assert ProbeReport.parse(p.stdout).tests == {"net": "ok", "net-big": "ok"}, p.stderr


# --- the shared plumbing (offload.py), against a recording back end ---

Calls = list[tuple[object, ...]]

class Recorder:
    """A back end (vhost or vhost-user, as the device needs) that records the calls it gets, in
    order, and refuses the one named ``refuse`` (EOPNOTSUPP). Its connection is a socket pair:
    closing ``peer`` is the back end going away."""

    path = "/run/fake-virtiofsd.sock"

    def __init__(self, features: int, refuse: str = "") -> None:
        self.features, self.refuse = features, refuse
        self.calls: Calls = []
        self.conn, self.peer = socket.socketpair()

    @property
    def fd(self) -> int:
        return self.conn.fileno()

    def _call(self, *call: object) -> None:
        self.calls.append(call)
        if call[0] == self.refuse:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def set_features(self, features: int) -> None:
        self._call("set_features", features)

    def set_mem_table(self, regions: list[tuple[int, int, int, int]], fd: int | None) -> None:
        self._call("set_mem_table", regions, fd)

    def start_vring(self, index: int, size: int, next_avail: int, rings: tuple[int, int, int],
                    kick: int, call: int) -> None:
        self._call("start_vring", index, size, next_avail, kick, call)

    def stop_vring(self, index: int) -> int:
        self._call("stop_vring", index)
        return 100 + index          # where the back end left the queue

    def set_backend(self, index: int, fd: int) -> None:
        self._call("set_backend", index, fd)

    def set_running(self, running: bool) -> None:
        self._call("set_running", running)

    def close(self) -> None:
        self.calls.append(("close",))
        self.conn.close()
        self.peer.close()


class FakeTap:
    fd = 1234                   # never read or written: the kernel does that

    def __init__(self) -> None:
        self.offloads: list[int] = []
        self.closed = False

    def set_offload(self, flags: int) -> bool:
        self.offloads.append(flags)
        return True

    def close(self) -> None:
        self.closed = True


QUEUE = 16
KINDS = ("vhost-net", "vhost-vsock", "virtio-fs")
# What each device adds to a start after the rings (its own switch), and to a stop before them.
ENABLE: dict[str, Calls] = {"vhost-net": [("set_backend", 0, FakeTap.fd), ("set_backend", 1, FakeTap.fd)],
                            "vhost-vsock": [("set_running", True)], "virtio-fs": []}
DISABLE: dict[str, Calls] = {"vhost-net": [("set_backend", 0, -1), ("set_backend", 1, -1)],
                             "vhost-vsock": [("set_running", False)], "virtio-fs": []}
STOPPED: Calls = [("stop_vring", 0), ("stop_vring", 1)]
REFUSED = {"vhost-net": "n0: vhost-net refused the queues: ",
           "vhost-vsock": "v0: vhost-vsock refused the queues: ", "virtio-fs": "fs0: "}


class Slot:
    """A virtio-mmio slot with the device ``kind`` on ``backend``, driven from the test as
    the guest's driver would."""

    def __init__(self, kind: str, backend: Recorder) -> None:
        self.backend, self.io = backend, EventLoop("test-io")
        self.mem = GuestMemory(layout.ram_regions(1 << 20), shared=kind == "virtio-fs")
        self.irqfd = os.eventfd(0, os.EFD_NONBLOCK)
        device: VirtioDevice
        if kind == "vhost-net":
            self.tap = FakeTap()
            device = VhostNet("n0", cast(Tap, self.tap), "52:54:00:00:00:01", self.io,
                              cast(vhost.Vhost, backend))
        elif kind == "vhost-vsock":
            device = VhostVsock("v0", 3, cast(vhost.Vhost, backend))
        else:
            device = VhostUserFs("fs0", "hostdir", cast(VhostUser, backend), self.io)
        self.device = device
        self.t = mmio.MmioTransport(device, self.mem, self.irqfd, self.io)

    def driver_ok(self, features: int = 1 << VIRTIO_F_VERSION_1) -> None:
        w = self.t.write
        for i in range(len(self.t.queues)):
            base = 0x10000 + 0x1000 * i
            for reg, value in ((mmio.QUEUE_SEL, i), (mmio.QUEUE_NUM, QUEUE), (mmio.QUEUE_DESC_LOW, base),
                               (mmio.QUEUE_DRIVER_LOW, base + 0x100), (mmio.QUEUE_DEVICE_LOW, base + 0x200),
                               (mmio.QUEUE_READY, 1)):
                w(reg, 4, value)
        for sel in (0, 1):
            w(mmio.DRIVER_FEATURES_SEL, 4, sel)
            w(mmio.DRIVER_FEATURES, 4, features >> 32 * sel & 0xFFFFFFFF)
        status = mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK
        w(mmio.STATUS, 4, status)
        w(mmio.STATUS, 4, status | mmio.DRIVER_OK)

    def handed_over(self, kind: str) -> Calls:
        """What a start asks, in order, of the back end of device ``kind``."""
        table = [(r.gpa, r.size, self.mem.host_address(r), r.offset) for r in self.mem.regions]
        return [("set_features", 1 << VIRTIO_F_VERSION_1), ("set_mem_table", table, self.mem.fd),
                *(("start_vring", i, QUEUE, 0, self.t.notify_fds[i], self.irqfd) for i in (0, 1)),
                *ENABLE[kind]]

    def close(self) -> None:
        self.t.close()
        self.io.stop()
        self.mem.close()
        os.close(self.irqfd)


# The back end offers VERSION_1 and EVENT_IDX, not INDIRECT_DESC (nor vhost-net's MRG_RXBUF).
BACKEND_FEATURES = COMMON_FEATURES & ~(1 << VIRTIO_F_INDIRECT_DESC)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """AltoVirt's log records, whatever an earlier test set up for the "altovirt" logger."""
    logger = logging.getLogger("altovirt")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.DEBUG, logger="altovirt"):
        yield caplog
    logger.removeHandler(caplog.handler)


def lines(caplog: pytest.LogCaptureFixture, level: int) -> set[tuple[str, str]]:
    return {(r.name, r.getMessage()) for r in caplog.records if r.levelno == level}


@pytest.mark.parametrize("kind", KINDS)
def test_rings_handed_over_at_driver_ok_and_taken_back_at_reset(kind: str,
                                                                logged: pytest.LogCaptureFixture) -> None:
    backend = Recorder(BACKEND_FEATURES)
    slot = Slot(kind, backend)
    try:
        offered = slot.device.device_features()
        assert not offered >> VIRTIO_F_INDIRECT_DESC & 1 and offered >> VIRTIO_F_VERSION_1 & 1
        slot.driver_ok()
        # Features, memory table, the served rings with the slot's ioeventfds and irqfd, then the
        # device's own switch; vhost-vsock's event queue (2) stays here.
        assert backend.calls == slot.handed_over(kind)
        module = {"vhost-net": "vhost_net", "vhost-vsock": "vhost_vsock", "virtio-fs": "vhost_user_fs"}[kind]
        served = {"vhost-net": "n0: vhost-net serves the queues",
                  "vhost-vsock": "v0: vhost-vsock serves CID 3",
                  "virtio-fs": f"fs0: the vhost-user back end at {Recorder.path} serves the queues"}[kind]
        assert (f"altovirt.devices.virtio.{module}", served) in lines(logged, logging.INFO)
        # The back end raises the interrupt behind our back: InterruptStatus always says so.
        assert slot.t.interrupt.read() == slot.t.interrupt.read() == INT_VRING
        backend.calls.clear()
        slot.device.reset()
        assert backend.calls == [*DISABLE[kind], *STOPPED]
        assert [q.next_avail for q in slot.t.queues[:2]] == [100, 101]    # from where it left them
        assert slot.t.interrupt.read() == 0
        slot.device.reset()
        slot.device.detach()
        assert backend.calls == [*DISABLE[kind], *STOPPED]              # stopped once
        assert slot.t.status & mmio.DEVICE_NEEDS_RESET == 0
    finally:
        slot.close()
    assert backend.calls[-1] == ("close",)


def test_a_vhost_net_nic_replaced_in_its_slot_closes_its_instance() -> None:
    """Hot-unplug puts an empty NIC in the slot: the vhost-net instance, the device's own, is
    closed with it (it was kept until the VM ended); its tap stays open with the netdev."""
    backend = Recorder(BACKEND_FEATURES)
    slot = Slot("vhost-net", backend)
    try:
        slot.driver_ok()
        slot.t.replace(Net("nic-slot0", None, "52:54:00:00:00:01", slot.io)).unplugged()
        assert backend.calls[-1] == ("close",) and not slot.tap.closed
    finally:
        slot.close()


def test_vhost_net_offers_what_the_kernel_serves_and_the_tap_its_offloads() -> None:
    backend = Recorder(BACKEND_FEATURES)
    slot = Slot("vhost-net", backend)
    try:
        offered = slot.device.device_features()
        assert not offered >> VIRTIO_NET_F_MRG_RXBUF & 1 and offered >> VIRTIO_NET_F_GUEST_CSUM & 1
        slot.driver_ok(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_GUEST_CSUM)
        assert slot.tap.offloads[-1] == TUN_F_CSUM                  # the tap does the guest's offloads
        assert backend.calls[0] == ("set_features", 1 << VIRTIO_F_VERSION_1)    # the kernel, the rings
    finally:
        slot.close()


@pytest.mark.parametrize("kind, refuse", [(k, c) for k in KINDS for c in (
    "set_features", "set_mem_table", "start_vring", *(e[0] for e in ENABLE[k][:1]))])
def test_a_refused_start_takes_the_queues_back_and_stops_that_device(
        kind: str, refuse: str, logged: pytest.LogCaptureFixture) -> None:
    backend = Recorder(BACKEND_FEATURES, refuse)
    slot = Slot(kind, backend)
    try:
        slot.driver_ok()
        asked = slot.handed_over(kind)
        refused_at = next(i for i, call in enumerate(asked) if call[0] == refuse)
        assert backend.calls == [*asked[:refused_at + 1], *DISABLE[kind], *STOPPED]
        assert slot.t.status & mmio.DEVICE_NEEDS_RESET and slot.device.broken
        assert ("altovirt.devices.virtio.device", f"{REFUSED[kind]}Operation not supported; the device needs "
                "a reset") in lines(logged, logging.ERROR)
        assert slot.t.interrupt.read() == INT_CONFIG                # NEEDS_RESET; the queues are here again
        assert slot.t.interrupt.read() == 0
        backend.calls.clear()
        slot.t.write(mmio.STATUS, 4, 0)                             # the driver resets the device
        assert backend.calls == []
    finally:
        slot.close()


@pytest.mark.parametrize("kind, reason", [
    ("vhost-net", "n0: a vhost-net NIC cannot be saved yet (use vhost=off)"),
    ("vhost-vsock", "v0: a vhost-vsock device cannot be saved yet (use -device vsock)"),
    ("virtio-fs", "fs0: a virtio-fs device cannot be saved (its state is the back end's)"),
])
def test_saves_are_refused_with_the_device_reason(kind: str, reason: str) -> None:
    slot = Slot(kind, Recorder(BACKEND_FEATURES))
    try:
        slot.driver_ok()
        with pytest.raises(SaveError) as refused:
            slot.t.save()
        assert str(refused.value) == reason
    finally:
        slot.close()


def test_a_back_end_that_goes_away_stops_that_device_only(logged: pytest.LogCaptureFixture) -> None:
    backend = Recorder(BACKEND_FEATURES)
    slot = Slot("virtio-fs", backend)
    try:
        slot.io.start()
        slot.driver_ok()
        backend.peer.close()
        deadline = time.monotonic() + 10
        while not slot.t.status & mmio.DEVICE_NEEDS_RESET:
            assert time.monotonic() < deadline, "the back end's end was not seen"
            time.sleep(0.01)
        assert ("altovirt.devices.virtio.device", f"fs0: the vhost-user back end at {Recorder.path} went "
                "away; the device needs a reset") in lines(logged, logging.ERROR)
        backend.calls.clear()
        slot.t.write(mmio.STATUS, 4, 0)                 # the driver resets the device...
        assert backend.calls == []                      # ...and the back end, gone, is not asked
        assert slot.t.interrupt.read() == 0            # the queues are here again (CONFIG read)
    finally:
        slot.close()
    assert backend.calls == [("close",)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_vm_closed_while_its_back_end_serves_stops_it_and_closes(kind: str) -> None:
    """As at the VM's end: the loop has stopped and the transport closes the notifiers first."""
    backend = Recorder(BACKEND_FEATURES)
    slot = Slot(kind, backend)
    slot.io.start()
    slot.driver_ok()
    backend.calls.clear()
    slot.io.stop()
    slot.close()
    assert backend.calls == [*DISABLE[kind], ("close",)]
