"""vsock with the hybrid unix-socket model: host-initiated and guest-initiated streams,
credit flow control, refusals, and the CONNECT handshake's errors; and what a guest that
floods the device can make it hold (issue 24)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.backends.unix import UnixListener
from altovirt.devices.virtio import vsock as vvsock
from altovirt.devices.virtio.device import VIRTIO_F_VERSION_1, Interrupt
from altovirt.devices.virtio.queue import Queue
from altovirt.eventloop import EventLoop
from altovirt.memory import GuestMemory

from .cabi import c_values, needs_gcc
from .conftest import PROBE_KERNEL, Vm, needs_kvm
from .unixsock import read_line
from .virtq import DriverQueue

OP, DST_PORT = 6, 3             # fields of a struct virtio_vsock_hdr, unpacked


@needs_gcc
def test_header_layout_and_constants() -> None:
    h = ("linux/virtio_vsock.h",)
    got = c_values(h, ("sizeof(struct virtio_vsock_hdr)", "offsetof(struct virtio_vsock_hdr, fwd_cnt)",
                       "VIRTIO_VSOCK_OP_REQUEST", "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
                       "VIRTIO_VSOCK_TYPE_STREAM", "VIRTIO_VSOCK_SHUTDOWN_RCV", "VIRTIO_VSOCK_SHUTDOWN_SEND",
                       "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET", "sizeof(struct virtio_vsock_event)"))
    assert list(got.values()) == [vvsock.HDR_SIZE, 40, vvsock.OP_REQUEST, vvsock.OP_CREDIT_REQUEST,
                                  vvsock.VIRTIO_VSOCK_TYPE_STREAM, vvsock.SHUTDOWN_RCV, vvsock.SHUTDOWN_SEND,
                                  vvsock.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, vvsock.EVENT.size]


@needs_kvm
def test_streams_both_ways(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    uds = tmp_path / "v.sock"
    guest_side: dict[str, bytes] = {}
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{uds}_6000")                       # the host service the guest connects to
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)
        guest_side["hello"] = conn.recv(100)
        conn.sendall(b"hi guest\n")
        guest_side["after"] = conn.recv(100)
        conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    vm = Vm("-kernel", str(probe / PROBE_KERNEL), "-device", f"vsock,id=vsock0,guest-cid=3,uds-path={uds}",
            "-append", "probe.run=vsock", "-serial", "stdio")
    vms.append(vm)
    vm.wait_line("probe: vsock cid=3 ready")
    # A bad handshake is refused; the device keeps serving.
    bad = socket.socket(socket.AF_UNIX)
    bad.settimeout(30)
    bad.connect(str(uds))
    bad.sendall(b"HELLO 5000\n")
    assert bad.recv(10) == b""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(uds))
    s.sendall(b"CONNECT 5000\n")
    assert read_line(s) == b"OK 1073741824\n"
    bulk = b"ping\n" + bytes(i & 0xFF for i in range(102400))
    s.sendall(bulk)
    assert read_line(s) == f"pong {zlib.crc32(bulk):08x}\n".encode()
    assert s.recv(10) == b""                          # the guest shut the stream down
    vm.wait_line("probe: test vsock ok")
    assert vm.finish()[0] == 0
    server.join(10)
    assert guest_side == {"hello": b"hello from the guest\n", "after": b""}
    crc = zlib.crc32(bulk)
    assert f"probe: vsock host-conn port=5000 bytes=102405 crc32=0x{crc:x} credit-ok=1" in vm.seen
    assert "probe: vsock guest-conn port=6000 reply=hi guest" in vm.seen
    assert "probe: vsock refused=rst" in vm.seen
    assert not uds.exists()                            # removed at exit
    listener.close()


class VsockBench:
    """A Vsock device in this process with the test as its guest driver: ``send`` puts packets
    on the transmit queue, ``post`` gives receive buffers, ``received`` reads what came back."""

    CID = 3
    GUEST_BUF_ALLOC = 64 << 10
    TX_BUFFERS, RX_BUFFERS = 0x200000, 0x400000     # descriptor i's buffer: BASE + 0x1000 * i

    def __init__(self, mem: GuestMemory, dev: vvsock.Vsock, tx: DriverQueue, rx: DriverQueue) -> None:
        self.mem, self.dev, self.tx, self.rx = mem, dev, tx, rx
        self.uds = dev.uds_path
        self.seen = 0               # used receive buffers read so far
        self.posted = 0             # receive buffers made available so far

    def send(self, packets: Iterable[tuple[int, int, int, bytes]]) -> None:
        """(guest port, host port, op, payload) packets, as many per notification as fit."""
        batch = 0
        for src, dst, op, data in packets:
            at = self.TX_BUFFERS + 0x1000 * self.tx.next_desc
            self.mem.write(at, vvsock.HDR.pack(self.CID, vvsock.VMADDR_CID_HOST, src, dst, len(data),
                                               vvsock.VIRTIO_VSOCK_TYPE_STREAM, op, 0,
                                               self.GUEST_BUF_ALLOC, 0) + data)
            self.tx.publish(self.tx.chain([(at, vvsock.HDR_SIZE + len(data), False)]))
            batch += 1
            if batch == self.tx.size // 2:
                self.dev.queue_notify(vvsock.TXQ)
                batch = 0
        if batch:
            self.dev.queue_notify(vvsock.TXQ)

    def post(self, count: int) -> None:
        assert self.posted - self.seen + count <= self.rx.size
        for _ in range(count):
            at = self.RX_BUFFERS + 0x1000 * self.rx.next_desc
            self.rx.publish(self.rx.chain([(at, 0x1000, True)]))
        self.posted += count
        self.dev.queue_notify(vvsock.RXQ)

    def received(self) -> list[tuple[tuple[int, ...], bytes]]:
        """(header, payload) of each receive buffer filled since the last call."""
        out = []
        while self.seen & 0xFFFF != self.rx.used_idx():
            head, length = self.rx.used_elem(self.seen)
            data = self.mem.read(self.RX_BUFFERS + 0x1000 * head, length)
            out.append((vvsock.HDR.unpack_from(data), data[vvsock.HDR_SIZE:]))
            self.seen += 1
        return out

    def drain(self) -> list[tuple[tuple[int, ...], bytes]]:
        """Post receive buffers until the device has nothing more to put in them."""
        out: list[tuple[tuple[int, ...], bytes]] = []
        while True:
            self.post(self.rx.size // 2 - (self.posted - self.seen))
            got = self.received()
            if not got:
                return out
            out += got

    def wait_for(self, op: int, port: int) -> bytes:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for h, data in self.received():
                if (h[OP], h[DST_PORT]) == (op, port):
                    return data
            time.sleep(0.01)
        raise AssertionError(f"no op {op} for guest port {port}")


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[VsockBench]:
    io = EventLoop()
    mem = GuestMemory(layout.ram_regions(16 << 20))
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    dev = vvsock.Vsock("vsock0", VsockBench.CID, UnixListener(str(tmp_path / "v.sock")), io)
    try:
        drivers, queues = [DriverQueue(mem, 0x100000 + 0x10000 * i, 256) for i in range(3)], []
        for d in drivers:
            q = Queue(vvsock.QUEUE_SIZE, mem)
            q.size, q.desc_addr, q.avail_addr, q.used_addr = d.size, d.desc, d.avail, d.used
            q.activate(1 << VIRTIO_F_VERSION_1)
            queues.append(q)
        dev.features = 1 << VIRTIO_F_VERSION_1
        dev.activate(mem, queues, Interrupt(irqfd, lambda why: None), io)
        io.start()
        yield VsockBench(mem, dev, drivers[vvsock.TXQ], drivers[vvsock.RXQ])
    finally:
        dev.close()
        io.stop()
        os.close(irqfd)
        mem.close()


def _ops(replies: list[tuple[tuple[int, ...], bytes]], op: int) -> list[int]:
    """The guest ports that got ``op``, in order."""
    return [h[DST_PORT] for h, _ in replies if h[OP] == op]


def test_a_flood_of_packets_wanting_replies_waits_in_a_bounded_queue(bench: VsockBench,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of packets that each want an answer (REQUESTs to a port nobody listens on,
    credit requests), with no receive buffer posted: what the device keeps for the guest stays
    within its queue of RXQ_SIZE entries (a connection's credit updates are one flag; RSTs beyond
    a queue full of them are dropped), a connection still works once buffers come, and the log
    says once that port 7000 refused the guest, not 5000 times."""
    caplog.set_level(logging.INFO, logger="altovirt")
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{bench.uds}_6000")
    server.listen(8)
    server.settimeout(10)
    bench.send([(1234, 6000, vvsock.OP_REQUEST, b"")])
    host, _ = server.accept()
    host.settimeout(10)
    host.sendall(b"early bytes")                    # before the guest has a buffer for them
    flood = 5000
    bench.send(p for i in range(flood) for p in ((20000 + i, 7000, vvsock.OP_REQUEST, b""),
                                                (1234, 6000, vvsock.OP_CREDIT_REQUEST, b"")))
    assert bench.received() == []                   # no buffer: nothing could go
    refusals = [r for r in caplog.records if "-> host port 7000 refused" in r.getMessage()]
    assert [r.levelno for r in refusals if r.levelno >= logging.INFO] == [logging.INFO]
    replies = bench.drain()
    # Before: 5000 RSTs and 5000 credit updates, every one kept until the guest took it.
    rsts = sorted(_ops(replies, vvsock.OP_RST))
    assert rsts == list(range(20000, 20000 + vvsock.RXQ_SIZE))   # the first ones; the rest dropped
    to_conn = [(h[OP], data) for h, data in replies if h[DST_PORT] == 1234]
    assert to_conn[:2] == [(vvsock.OP_RESPONSE, b""), (vvsock.OP_CREDIT_UPDATE, b"")]
    early = to_conn[2:] or [(vvsock.OP_RW, bench.wait_for(vvsock.OP_RW, 1234))]    # (if the I/O
    assert early == [(vvsock.OP_RW, b"early bytes")]                                # thread was late)
    # The connection works both ways, and a new one is answered at once.
    bench.send([(1234, 6000, vvsock.OP_RW, b"hello host")])
    assert host.recv(100) == b"hello host"
    host.sendall(b"hello guest")
    assert bench.wait_for(vvsock.OP_RW, 1234) == b"hello guest"
    bench.send([(1235, 6000, vvsock.OP_REQUEST, b"")])
    assert _ops(bench.received(), vvsock.OP_RESPONSE) == [1235]
    host.close()
    server.close()


def _vsock_memory() -> int:
    """Bytes traced since tracemalloc started, allocated with the vsock package on the stack."""
    package = str(Path(vvsock.__file__).parent / "*")
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, package, all_frames=True)])
    return sum(s.size for s in snap.statistics("filename"))


@contextlib.contextmanager
def _fds(needed: int, wanted: int) -> Iterator[None]:
    """At least ``needed`` file descriptors, ``wanted`` if the hard limit allows, for a while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if max(soft, limit) < needed:
        pytest.skip(f"needs {needed} file descriptors (RLIMIT_NOFILE hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_beyond_the_cap_are_refused_and_memory_stays_bounded(bench: VsockBench) -> None:
    """A guest that opens connections without end gets MAX_CONNECTIONS of them, and RST for
    the rest: the host service is not asked for more, and the device's memory stops growing."""
    cap, extra = vvsock.MAX_CONNECTIONS, 4000
    with _fds(2 * cap + 200, 2 * (cap + extra) + 200):     # (the second: what it took before the cap)
        _open_too_many(bench, cap, extra)


def _open_too_many(bench: VsockBench, cap: int, extra: int) -> None:
    peers: list[socket.socket] = []

    def connect() -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        peers.append(theirs)
        return ours

    bench.dev.serve(6000, connect)
    tracemalloc.start(8)
    try:
        bench.send((10000 + i, 6000, vvsock.OP_REQUEST, b"") for i in range(cap))
        before = _vsock_memory()
        bench.send((30000 + i, 6000, vvsock.OP_REQUEST, b"") for i in range(extra))
        grown = _vsock_memory() - before
    finally:
        tracemalloc.stop()
    print(f"the vsock package's memory grew by {grown} bytes over {extra} connections beyond the cap")
    assert grown < 64 << 10         # RXQ_SIZE RSTs; before, MiBs: a connection and a socket each
    assert len(peers) == cap
    replies = bench.drain()
    assert sorted(_ops(replies, vvsock.OP_RESPONSE)) == list(range(10000, 10000 + cap))   # each once
    assert sorted(_ops(replies, vvsock.OP_RST)) == list(range(30000, 30000 + vvsock.RXQ_SIZE))
    # With buffers there, one more is refused at once; one closed makes room for another.
    bench.send([(40000, 6000, vvsock.OP_REQUEST, b"")])
    assert [(h[OP], h[DST_PORT]) for h, _ in bench.received()] == [(vvsock.OP_RST, 40000)]
    bench.send([(10000, 6000, vvsock.OP_RST, b""), (40001, 6000, vvsock.OP_REQUEST, b""),
                (40001, 6000, vvsock.OP_RW, b"still served")])
    assert [(h[OP], h[DST_PORT]) for h, _ in bench.received()] == [(vvsock.OP_RESPONSE, 40001)]
    assert len(peers) == cap + 1
    peers[-1].settimeout(10)
    assert peers[-1].recv(100) == b"still served"
    for p in peers:
        p.close()


def test_a_host_service_with_a_full_backlog_refuses_instead_of_stalling(bench: VsockBench) -> None:
    """The guest's connections to a host socket that accepts none of them: those beyond its
    backlog get RST at once, where a blocking connect would hold the VMM's I/O thread."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{bench.uds}_6000")
    server.listen(1)
    sender = threading.Thread(target=bench.send, daemon=True,
                              args=([(5000 + i, 6000, vvsock.OP_REQUEST, b"") for i in range(4)],))
    sender.start()
    sender.join(10)
    try:
        assert not sender.is_alive(), "the device waits in connect() for the host service"
    finally:
        server.setblocking(False)
        accepted = []
        while sender.is_alive():                    # let a stalled device go, for the teardown
            try:
                accepted.append(server.accept()[0])
            except BlockingIOError:
                time.sleep(0.05)
    replies = bench.drain()
    assert _ops(replies, vvsock.OP_RESPONSE) == [5000, 5001]     # the backlog of 1 (Linux: one more)
    assert _ops(replies, vvsock.OP_RST) == [5002, 5003]
    server.close()


def test_the_devices_counters_for_firecrackers_metrics(bench: VsockBench) -> None:
    """Packets and bytes each way and the queues' notifications, as Firecracker's vsock metrics
    name them: three requests to ports nobody serves, each answered with a reset."""
    bench.send([(1000 + i, 7000, vvsock.OP_REQUEST, b"") for i in range(3)])
    bench.send([(1003, 7000, vvsock.OP_RW, b"x" * 100)])      # to no connection: reset too
    assert sorted(_ops(bench.drain(), vvsock.OP_RST)) == [1000, 1001, 1002, 1003]
    counters = bench.dev.counters
    sent, received = (counters["tx_packets_count"], counters["tx_bytes_count"]), counters["rx_packets_count"]
    assert (sent, received) == ((4, 100), 4)
    assert counters["tx_queue_event_count"] == 2 and counters["rx_queue_event_count"] >= 1
