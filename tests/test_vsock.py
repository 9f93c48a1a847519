"""vsock with the hybrid unix-socket model: host-initiated and guest-initiated streams,
credit flow control, refusals, and the CONNECT handshake's errors."""

from __future__ import annotations

import socket
import threading
import zlib
from pathlib import Path

from altovirt.devices.virtio import vsock as vvsock

from .cabi import c_values, needs_gcc
from .conftest import Vm, needs_kvm
from .unixsock import read_line


@needs_gcc
def test_header_layout_and_constants() -> None:
    h = ("linux/virtio_vsock.h",)
    got = c_values(h, ("sizeof(struct virtio_vsock_hdr)", "offsetof(struct virtio_vsock_hdr, fwd_cnt)",
                       "VIRTIO_VSOCK_OP_REQUEST", "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
                       "VIRTIO_VSOCK_TYPE_STREAM", "VIRTIO_VSOCK_SHUTDOWN_RCV", "VIRTIO_VSOCK_SHUTDOWN_SEND",
                       "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET", "sizeof(struct virtio_vsock_event)"))
    assert list(got.values()) == [vvsock.HDR_SIZE, 40, vvsock.OP_REQUEST, vvsock.OP_CREDIT_REQUEST,
                                  vvsock.VIRTIO_VSOCK_TYPE_STREAM, vvsock.SHUTDOWN_RCV, vvsock.SHUTDOWN_SEND,
                                  vvsock.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, vvsock._EVENT.size]



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
    vm = Vm("-kernel", str(probe / "probe.elf"), "-device", f"vsock,id=vsock0,guest-cid=3,uds-path={uds}",
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
