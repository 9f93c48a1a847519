"""virtio-console on a unix socket: both directions, one client at a time, no blocking."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from .conftest import Vm, needs_kvm, needs_qemu, qemu_cmd
from .unixsock import read_line

PROBE_LINES = ["probe: console unconnected-tx=65536", "probe: console rx=ping from the host",
               "probe: console tx done", "probe: test console ok", "probe: done ok"]


def talk(sock_path: Path, second_client: bool) -> tuple[bytes, bytes | None]:
    """Connect, send a line, return the answer (and what a second client got)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(sock_path))
    refused = None
    if second_client:
        s2 = socket.socket(socket.AF_UNIX)
        s2.settimeout(10)
        s2.connect(str(sock_path))
        refused = s2.recv(16)           # closed at once: EOF
        s2.close()
    s.sendall(b"ping from the host\n")
    answer = read_line(s)
    s.close()
    return answer, refused


@needs_kvm
def test_console_both_ways(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    sock = tmp_path / "console.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-chardev", f"id=console0,path={sock}",
            "-append", "probe.run=console", "-serial", "stdio")
    vms.append(vm)
    vm.wait_line("probe: console ready")
    answer, refused = talk(sock, second_client=True)
    assert answer == b"pong ping from the host\n" and refused == b""
    code, err = vm.finish()
    assert code == 0 and err == ""
    assert [ln for ln in vm.seen if ln in PROBE_LINES] == PROBE_LINES
    assert not sock.exists()                                # removed at exit


@needs_qemu
def test_console_agrees_with_qemu(probe: Path, tmp_path: Path) -> None:
    sock = tmp_path / "qemu-console.sock"
    cmd = qemu_cmd(probe / "probe.elf", "probe.run=console",
                   devices=("virtio-serial-device,max_ports=1", "virtconsole,chardev=c0,nr=0"),
                   extra=("-chardev", f"socket,id=c0,path={sock},server=on,wait=off"))
    q = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         text=True)
    try:
        assert q.stdout is not None
        seen = []
        for line in q.stdout:
            seen.append(line.strip())
            if line.startswith("probe: console ready"):
                answer, _ = talk(sock, second_client=False)
                assert answer == b"pong ping from the host\n"
        assert [ln for ln in seen if ln in PROBE_LINES] == PROBE_LINES
    finally:
        q.kill()
        q.wait()
        if sock.exists():
            os.unlink(sock)
