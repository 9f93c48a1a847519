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
from altovirt.memory import GuestMemory
from altovirt.vmm.iothread import IoThread

from .cabi import c_values, needs_gcc
from .conftest import ROOT, ProbeReport, altovirt_cmd, qemu_cmd
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


@needs_netns
def test_reception_is_paced_by_guest_buffers() -> None:
    """Frames wait in the tap while the guest has no receive buffers, and arrive as it posts them."""
    name = f"avt{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    io = IoThread()
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
            q = Queue(256)
            q.size, q.desc_addr, q.avail_addr, q.used_addr = 16, d.desc, d.avail, d.used
            q.activate(mem, features)
            queues.append(q)
        dev.features = features
        dev.activate(mem, queues, Interrupt(irqfd, lambda why: None), io)
        rx = drivers[0]
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind((name, 0))
        for i in range(3):
            payload = f"frame {i}".encode().ljust(46, b".")
            sender.send(b"\xff" * 6 + b"\x02" + b"\x00" * 5 + b"\x88\xb5" + payload)
        time.sleep(0.3)
        assert rx.used_idx() == 0                      # nothing to put them in: they wait

        def post_and_wait(count: int, expect: int) -> None:
            for _ in range(count):
                rx.publish(rx.chain([(0x200000 + 0x1000 * rx.next_desc, 2048, True)]))
            dev.queue_notify(0)
            deadline = time.monotonic() + 10
            while rx.used_idx() < expect:
                assert time.monotonic() < deadline, rx.used_idx()
                time.sleep(0.01)

        post_and_wait(1, 1)
        time.sleep(0.2)
        assert rx.used_idx() == 1                      # one buffer, one frame
        post_and_wait(2, 3)
        frames = []
        for i in range(3):
            head, length = rx.used_elem(i)
            data = mem.read(0x200000 + 0x1000 * head, length)
            assert struct.unpack_from("<H", data, 10)[0] == 1          # num_buffers
            frames.append(data[12 + 14:12 + 21])
        assert frames == [b"frame 0", b"frame 1", b"frame 2"]           # in order, none lost
        sender.close()
    finally:
        if dev is not None:
            dev.close()
        io.stop()
        os.close(irqfd)
        mem.close()
        subprocess.run(["ip", "link", "del", name], capture_output=True)
