"""virtio-net on a tap in a network namespace the test creates; a raw-Ethernet echo
responder (no IP traffic at all) answers the probe's frames."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.backends import tap as tapmod
from altovirt.devices.virtio import net as vnet
from altovirt.devices.virtio.device import VIRTIO_F_VERSION_1, Interrupt
from altovirt.devices.virtio.queue import Queue
from altovirt.eventloop import EventLoop
from altovirt.memory import GuestMemory

from .cabi import c_values, needs_gcc
from .conftest import ROOT, ProbeReport, altovirt_cmd, needs_kvm, qemu_cmd
from .livecopy import LiveCopy
from .netns import NetNs, needs_netns
from .virtq import DriverQueue


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs(("tap0", "tap1"))
    yield ns
    ns.close()


@needs_gcc
def test_constants_match_linux_headers() -> None:
    names = {n: getattr(vnet, n) for n in dir(vnet)
             if n.startswith("VIRTIO_NET_F_") or n == "VIRTIO_NET_S_LINK_UP"}
    assert c_values(("linux/virtio_net.h",), tuple(names)) == names
    tun = {n: getattr(tapmod, n) for n in ("TUNSETIFF", "TUNSETOFFLOAD", "TUNSETVNETHDRSZ", "IFF_TAP",
                                           "IFF_NO_PI", "IFF_VNET_HDR", "TUN_F_CSUM", "TUN_F_TSO4",
                                           "TUN_F_TSO6", "TUN_F_TSO_ECN")}
    assert c_values(("sys/ioctl.h", "linux/if_tun.h"), tuple(tun)) == tun
    sizes = {"sizeof(struct virtio_net_hdr_v1)": tapmod.VNET_HDR_SIZE,
             "offsetof(struct virtio_net_hdr_v1, num_buffers)": vnet.NUM_BUFFERS_OFFSET,
             "offsetof(struct virtio_net_config, status)": 6,
             "offsetof(struct virtio_net_config, max_virtqueue_pairs)": 8,
             "offsetof(struct virtio_net_config, mtu)": 10}
    assert c_values(("linux/virtio_net.h",), tuple(sizes)) == sizes


@needs_netns
def test_frames_both_ways(probe: Path, netns: NetNs) -> None:
    p = netns.run(altovirt_cmd("-kernel", str(probe / "probe.elf"), "-netdev", "id=net0,netdev=tap0",
                               "-append", "probe.run=net,net-big", "-serial", "stdio"))
    r = ProbeReport.parse(p.stdout)
    assert p.returncode == 0, p.stderr
    assert r.tests == {"net": "ok", "net-big": "ok"}
    # a 4000-byte frame in 2 KiB receive buffers: merged (VIRTIO_NET_F_MRG_RXBUF)
    assert r.line("net-big") == "net-big bytes=4000 num_buffers=2 match=1"
    line = r.line("net mac=")
    assert line.startswith("net mac=52:54:00:") and line.endswith(" link=1 tx=32 rx=32")   # a generated MAC


@needs_netns
def test_two_nics_agree_with_qemu(probe: Path, netns: NetNs) -> None:
    mac = "0e:90:df:9f:a8:88"
    alto = netns.run(altovirt_cmd("-kernel", str(probe / "probe.elf"),
                                  "-netdev", f"id=n0,netdev=tap0,mac={mac}", "-netdev", "id=n1,netdev=tap1",
                                  "-append", "probe.run=net,net-big", "-serial", "stdio"))
    qemu = netns.run(qemu_cmd(probe / "probe.elf", "probe.run=net,net-big",
                              devices=(f"virtio-net-device,netdev=n0,mac={mac}",),
                              extra=("-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no")))
    a, q = ProbeReport.parse(alto.stdout), ProbeReport.parse(qemu.stdout)
    assert a.tests == q.tests == {"net": "ok", "net-big": "ok"}
    assert a.line("net mac=") == q.line("net mac=") == f"net mac={mac} link=1 tx=32 rx=32"
    assert a.line("net-big") == q.line("net-big")
    assert a.values["cmdline"].count("virtio_mmio.device=") == 2


@needs_netns
def test_tap_errors(probe: Path, netns: NetNs) -> None:
    kernel = ["-kernel", str(probe / "probe.elf")]
    missing = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap9"))
    assert missing.returncode == 2
    assert missing.stderr == ("altovirt: error: -netdev id=n0: tap tap9 does not exist; create it first "
                              "(ip tuntap add dev tap9 mode tap)\n")
    not_tap = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=lo"))
    assert not_tap.returncode == 2
    assert not_tap.stderr == "altovirt: error: -netdev id=n0: lo is not a tap device\n"
    holder = subprocess.Popen(netns.cmd(*altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0",
                                                      "-append", "probe.run=wait", "-serial", "stdio")),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None
        while "probe: waiting" not in holder.stdout.readline():
            pass
        busy = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0"))
        assert busy.returncode == 2
        assert busy.stderr == "altovirt: error: -netdev id=n0: tap tap0 is in use by another process\n"
    finally:
        holder.terminate()
        assert holder.wait(30) == 143


class RxBench:
    """A Net device on a fresh tap, driven from the test as its guest driver: ``rx`` is the
    driver's receive queue and ``send`` puts an Ethernet frame on the tap's wire."""

    BUFFERS = 0x200000          # receive buffer i sits at BUFFERS + 0x1000 * i

    def __init__(self, mem: GuestMemory, dev: vnet.Net, rx: DriverQueue, sender: socket.socket) -> None:
        self.mem, self.dev, self.rx, self._sender = mem, dev, rx, sender

    def send(self, payload: bytes) -> None:
        self._sender.send(b"\xff" * 6 + b"\x02" + b"\x00" * 5 + b"\x88\xb5" + payload)

    def post(self, count: int, size: int) -> None:
        for _ in range(count):
            self.rx.publish(self.rx.chain([(self.BUFFERS + 0x1000 * self.rx.next_desc, size, True)]))
        self.dev.queue_notify(vnet.RXQ)

    def wait_used(self, expect: int) -> None:
        deadline = time.monotonic() + 10
        while self.rx.used_idx() < expect:
            assert time.monotonic() < deadline, self.rx.used_idx()
            time.sleep(0.01)

    def used(self, i: int) -> bytes:
        """What the device wrote into the i-th used buffer."""
        head, length = self.rx.used_elem(i)
        return self.mem.read(self.BUFFERS + 0x1000 * head, length)


@pytest.fixture
def rx_bench() -> Iterator[RxBench]:
    name = f"avt{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    io = EventLoop()
    mem = GuestMemory(layout.ram_regions(128 << 20))
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    dev = None
    try:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False)
        dev = vnet.Net("n0", tapmod.Tap(name), "52:54:00:00:00:01", io)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        io.start()
        drivers, queues = [DriverQueue(mem, 0x100000, 16), DriverQueue(mem, 0x110000, 16)], []
        features = 1 << VIRTIO_F_VERSION_1 | 1 << vnet.VIRTIO_NET_F_MRG_RXBUF
        for d in drivers:
            q = Queue(256, mem)
            q.size, q.desc_addr, q.avail_addr, q.used_addr = 16, d.desc, d.avail, d.used
            q.activate(features)
            queues.append(q)
        dev.features = features
        dev.activate(mem, queues, Interrupt(irqfd, lambda why: None), io)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sender:
            sender.bind((name, 0))
            yield RxBench(mem, dev, drivers[vnet.RXQ], sender)
    finally:
        if dev is not None:
            dev.close()
        io.stop()
        os.close(irqfd)
        mem.close()
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@needs_netns
def test_reception_is_paced_by_guest_buffers(rx_bench: RxBench) -> None:
    """Frames wait in the tap while the guest has no receive buffers, and arrive as it posts them."""
    for i in range(3):
        rx_bench.send(f"frame {i}".encode().ljust(46, b"."))
    time.sleep(0.3)
    assert rx_bench.rx.used_idx() == 0                      # nothing to put them in: they wait
    rx_bench.post(1, 2048)
    rx_bench.wait_used(1)
    time.sleep(0.2)
    assert rx_bench.rx.used_idx() == 1                      # one buffer, one frame
    rx_bench.post(2, 2048)
    rx_bench.wait_used(3)
    frames = []
    for i in range(3):
        data = rx_bench.used(i)
        assert struct.unpack_from("<H", data, 10)[0] == 1   # num_buffers
        frames.append(data[12 + 14:12 + 21])
    assert frames == [b"frame 0", b"frame 1", b"frame 2"]   # in order, none lost


@needs_kvm
@needs_netns
def test_a_frame_received_during_a_live_migration_reaches_the_destination(rx_bench: RxBench) -> None:
    """Receive buffers the device took before a pass of a live migration and filled after it:
    the next pass sends the frame (they are noted as written when used, not when taken)."""
    copy = LiveCopy(rx_bench.mem)
    try:
        copy.first_pass()
        rx_bench.post(8, 4096)
        rx_bench.send(b"the first frame".ljust(46, b"."))
        rx_bench.wait_used(1)           # the device holds the other buffers for the next frames
        copy.next_pass()
        rx_bench.send(b"the second frame".ljust(46, b"."))
        rx_bench.wait_used(2)
        dest = copy.finish()
        head, length = rx_bench.rx.used_elem(1)
        where = RxBench.BUFFERS + 0x1000 * head
        assert rx_bench.used(1)[12 + 14:12 + 30] == b"the second frame"
        assert dest[where:where + length] == rx_bench.used(1)
    finally:
        copy.close()


@needs_netns
def test_frames_span_small_mergeable_buffers(rx_bench: RxBench) -> None:
    """With small buffers a frame takes as many as it needs, in order, and says how many in
    num_buffers; the next frame starts in the next buffer, so none is skipped or used twice."""
    rx_bench.post(12, 256)
    sizes = [990, 46, 600]                   # with the 12-byte header and 14-byte Ethernet header:
    for i, size in enumerate(sizes):          # 4, 1 and 3 buffers of 256 bytes
        rx_bench.send(bytes([0x41 + i]) * size)
    rx_bench.wait_used(8)
    time.sleep(0.2)
    assert rx_bench.rx.used_idx() == 8
    assert [rx_bench.rx.used_elem(i) for i in range(8)] == [
        (0, 256), (1, 256), (2, 256), (3, 1016 - 768), (4, 72), (5, 256), (6, 256), (7, 626 - 512)]
    received = []
    for first, count in ((0, 4), (4, 1), (5, 3)):
        assert struct.unpack_from("<H", rx_bench.used(first), 10)[0] == count     # num_buffers
        received.append(b"".join(rx_bench.used(i) for i in range(first, first + count))[12 + 14:])
    assert received == [bytes([0x41 + i]) * size for i, size in enumerate(sizes)]
    rx_bench.send(b"D" * 46)                  # the four buffers left still take frames
    rx_bench.wait_used(9)
    assert rx_bench.used(8)[12 + 14:] == b"D" * 46


@needs_netns
def test_saving_gives_held_buffers_back(rx_bench: RxBench) -> None:
    """The receive buffers the device holds for the next frame go back to the driver before
    the queue is saved, untouched, and are taken again in order."""
    rx_bench.post(4, 2048)
    rx_bench.send(b"first".ljust(46, b"."))
    rx_bench.wait_used(1)
    assert rx_bench.dev.active is not None
    rxq = rx_bench.dev.active.queues[vnet.RXQ]
    assert rxq.next_avail == 4              # three held for the next frame
    rx_bench.dev.prepare_save()
    assert rxq.next_avail == 1              # a saved queue holds none of them
    rx_bench.send(b"second".ljust(46, b"."))
    rx_bench.wait_used(2)
    assert rx_bench.rx.used_elem(1)[0] == 1
    assert rx_bench.used(1)[12 + 14:12 + 20] == b"second"


@needs_netns
def test_a_frame_waits_for_enough_buffers_and_arrives_whole(rx_bench: RxBench) -> None:
    """A frame larger than the buffers posted is not cut to fit: it waits for the driver to
    post more and then fills them all (QEMU and Firecracker wait likewise); before, it arrived
    cut short in the one buffer, with a header that still called it whole."""
    rx_bench.post(1, 256)
    rx_bench.send(b"L" * 990)               # with both headers: 4 buffers of 256 bytes
    time.sleep(0.3)
    assert rx_bench.rx.used_idx() == 0
    rx_bench.post(2, 256)
    time.sleep(0.3)
    assert rx_bench.rx.used_idx() == 0      # 3 buffers are not enough either
    rx_bench.post(2, 256)
    rx_bench.wait_used(4)
    assert struct.unpack_from("<H", rx_bench.used(0), 10)[0] == 4
    assert b"".join(rx_bench.used(i) for i in range(4))[12 + 14:] == b"L" * 990
    rx_bench.send(b"S" * 46)                # the buffer left takes the next frame
    rx_bench.wait_used(5)
    assert rx_bench.used(4)[12 + 14:] == b"S" * 46


@needs_netns
def test_a_frame_larger_than_the_whole_ring_is_dropped_and_reception_goes_on(rx_bench: RxBench) -> None:
    """Waiting for buffers a full ring cannot give would stop reception for good."""
    rx_bench.post(16, 64)                   # the driver's whole ring: 1024 bytes
    rx_bench.send(b"L" * 1200)
    rx_bench.send(b"S" * 46)
    rx_bench.wait_used(2)
    assert struct.unpack_from("<H", rx_bench.used(0), 10)[0] == 2
    assert (rx_bench.used(0) + rx_bench.used(1))[12 + 14:] == b"S" * 46
