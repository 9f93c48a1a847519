"""virtio-fs through a vhost-user back end: QEMU's virtiofsd answers the probe's FUSE_INIT from
shared guest RAM, and back ends that are missing, die or talk nonsense stop only that device.
Linux mounts it in the test bed (tests/linux/test_kata.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from .conftest import ROOT, Vm, altovirt_cmd, needs_kvm
from .test_cli import usage_error

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
needs_virtiofsd = pytest.mark.skipif(not VIRTIOFSD.exists(), reason="SKIPPED LOUDLY: no QEMU virtiofsd "
                                     f"at {VIRTIOFSD} (apt-get install qemu-system-common)")
pytestmark = needs_kvm


def fs_args(probe: Path, sock: Path, run: str, *more: str) -> list[str]:
    return ["-kernel", str(probe / "probe.elf"), "-append", f"probe.run={run}", "-serial", "stdio",
            "-machine", "mem-share=on", "-chardev", f"socket,id=fs,path={sock}",
            "-device", "vhost-user-fs-device,chardev=fs,tag=hostdir,id=fs0", *more]


@pytest.fixture
def virtiofsd(tmp_path: Path) -> Iterator[Path]:
    """QEMU's virtiofsd sharing a directory, listening on the socket it returns."""
    share, sock = tmp_path / "share", tmp_path / "vfs.sock"
    share.mkdir()
    proc = subprocess.Popen([str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={share}",
                             "-o", "cache=none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "virtiofsd did not start"
        time.sleep(0.02)
    yield sock
    proc.kill()
    proc.wait()


@needs_virtiofsd
def test_fuse_init_answered_by_virtiofsd(probe: Path, virtiofsd: Path) -> None:
    run = subprocess.run(altovirt_cmd(*fs_args(probe, virtiofsd, "fs,rng"), "-device", "virtio-rng"),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("probe: fs tag="))
    assert line.startswith("probe: fs tag=hostdir used=80 error=0 unique=0x1234 major=7 ")
    assert "probe: test fs ok" in run.stdout and "probe: test rng ok" in run.stdout


def test_shared_ram_is_required(probe: Path, tmp_path: Path) -> None:
    args = [a for a in fs_args(probe, tmp_path / "none.sock", "info") if a != "mem-share=on"]
    args.remove("-machine")
    assert usage_error(*args) == ("altovirt: error: -device vhost-user-fs-device id=fs0: the back end maps "
                                  "guest RAM; add -machine mem-share=on")


def test_no_back_end_is_one_line(probe: Path, tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    assert usage_error(*fs_args(probe, sock, "info")) == (
        f"altovirt: error: -device vhost-user-fs-device id=fs0: vhost-user back end {sock}: "
        "No such file or directory")


class FakeBackEnd:
    """A vhost-user back end that misbehaves as ``serve`` says, on its own thread."""

    def __init__(self, path: Path, serve: Callable[[socket.socket], None]) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._run, args=(serve,), daemon=True)
        self.thread.start()

    def _run(self, serve: Callable[[socket.socket], None]) -> None:
        with contextlib.suppress(OSError):     # the VMM may hang up first
            conn, _ = self.server.accept()
            with conn:
                serve(conn)

    def close(self) -> None:
        self.server.close()


def receive(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := conn.recv(n - len(data))):
        data += chunk
    return data


def handshake(conn: socket.socket) -> None:
    """Answer SET_OWNER and GET_FEATURES (VERSION_1 only) as a back end would."""
    receive(conn, 12)                                               # SET_OWNER
    request, _, _ = struct.unpack("<III", receive(conn, 12))        # GET_FEATURES
    conn.sendall(struct.pack("<IIIQ", request, 0x5, 8, 1 << 32))


def garbage(conn: socket.socket) -> None:
    receive(conn, 24)                   # SET_OWNER, GET_FEATURES
    conn.sendall(b"\x07" * 20)
    receive(conn, 1)                    # until the VMM hangs up


@pytest.mark.parametrize("serve, error", [
    (lambda conn: None, "closed the connection"),
    (garbage, "a bad reply to request 1 (request 117901063, flags 0x7070707, 117901063 bytes)"),
])
def test_bad_back_ends_at_start_are_one_line(probe: Path, tmp_path: Path,
                                             serve: Callable[[socket.socket], None], error: str) -> None:
    sock = tmp_path / "fake.sock"
    fake = FakeBackEnd(sock, serve)
    try:
        message = usage_error(*fs_args(probe, sock, "info"))
    finally:
        fake.close()
    prefix = "altovirt: error: -device vhost-user-fs-device id=fs0: vhost-user back end"
    assert message == f"{prefix} {sock}: {error}"


def test_back_end_death_stops_only_that_device(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    sock, qmp, log = tmp_path / "fake.sock", tmp_path / "qmp.sock", tmp_path / "vm.log"
    gone = threading.Event()

    def serve(conn: socket.socket) -> None:
        handshake(conn)
        gone.wait(30)                   # then the connection closes: the back end is gone

    fake = FakeBackEnd(sock, serve)
    try:
        vm = Vm(*fs_args(probe, sock, "wait", "-api-channel", f"unix:{qmp}", "-D", str(log)))
        vms.append(vm)
        vm.wait_line("probe: waiting")
        gone.set()
        deadline = time.monotonic() + 10
        while "went away; the device needs a reset" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        mon = QEMUMonitorProtocol(str(qmp))
        mon.connect()
        assert mon.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
        assert mon.cmd_obj({"execute": "quit"}) == {"return": {}}
        with contextlib.suppress(EOFError):     # qemu.qmp reports the close that quit asked for
            mon.close()
        assert vm.finish()[0] == 0
    finally:
        fake.close()
    assert "fs0: the vhost-user back end at " in log.read_text()
    assert os.path.exists(sock)
