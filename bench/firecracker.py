#!/usr/bin/env python3
"""Start-up benchmark of ``altovirt-firecracker`` (Firecracker's API) against QEMU microvm.

Over --runs rounds (alternating the VMMs, medians printed), on the probe guest:
  * API ready: process start to the API socket accepting a connection, and to the first
    answer (GET /); QEMU: process start to its QMP greeting (-S, the same machine);
  * InstanceStart: the request's latency, and the time from it to the probe's first
    instruction (its boot-timer write, logged with --boot-timer);
  * a tool's whole start: process start to InstanceStart answered (socket wait, PUT
    boot-source, PUT machine-config, InstanceStart);
  * snapshot/load with resume_vm in a fresh process: the request's latency (the guest
    runs when it is answered); the snapshot is taken of the probe's snapshot test;
  * boot to power-off with --config-file --no-api, and QEMU microvm's on the same probe.

    .venv/bin/python bench/firecracker.py [--runs 11]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
from boot import measure, qemu_cmd
from common import ROOT
from qemu.qmp import QMPClient

FIRECRACKER = [str(ROOT / ".venv" / "bin" / "altovirt-firecracker")]
CMDLINE = "console=ttyS0 probe.run=info"


def wait_connect(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> socket.socket:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"{path} never accepted a connection") from None
            time.sleep(0.0005)


def request(s: socket.socket, method: str, path: str, body: object = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    s.sendall(f"{method} {path} HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    reply = s.recv(65536)
    if not reply.startswith((b"HTTP/1.1 200", b"HTTP/1.1 204")):
        raise RuntimeError(f"{method} {path}: {reply!r}")
    return reply


def api_round(d: Path, probe: Path) -> dict[str, float]:
    """One altovirt-firecracker process: ready, first answer, InstanceStart, boot timer."""
    sock, log = d / "api.sock", d / "fc.log"
    for p in (sock, log):
        p.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([*FIRECRACKER, "--api-sock", str(sock), "--boot-timer", "--log-path", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = wait_connect(sock, proc)
    ready = time.perf_counter()
    request(s, "GET", "/")
    answered = time.perf_counter()
    request(s, "PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": CMDLINE})
    request(s, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    before = time.perf_counter()
    request(s, "PUT", "/actions", {"action_type": "InstanceStart"})
    started = time.perf_counter()
    s.close()
    proc.wait(30)
    m = re.search(r"boot timer: value=0x1 at ([\d.]+) ms since InstanceStart", log.read_text())
    if m is None:
        raise RuntimeError(f"no boot-timer mark in {log}")
    return {"ready": (ready - start) * 1e3, "first answer": (answered - start) * 1e3,
            "InstanceStart request": (started - before) * 1e3,
            "InstanceStart to boot timer": float(m.group(1)),
            "process start to InstanceStart answered": (started - start) * 1e3}


def qmp_ready(d: Path, probe: Path) -> float:
    """Process start to QEMU's QMP greeting, read by qemu.qmp (which checks its form) on the
    socket once it accepts; negotiation is left out, the greeting being the mark. qemu.qmp
    costs some 0.5 ms more than a raw read of the greeting (connect to greeting 0.75 ms against
    0.2, median of 200 against one QEMU), lost in this figure's spread: 35.8 ms either way,
    median of 30 rounds alternating with a raw read."""
    path = d / "qmp.sock"
    path.unlink(missing_ok=True)
    loop = asyncio.new_event_loop()
    qmp = QMPClient("bench")
    qmp.negotiate = False                   # greeting only (await_greeting stays on)
    start = time.perf_counter()
    cmd = [*qemu_cmd(probe)[:-4], "-S", "-qmp", f"unix:{path},server=on,wait=off", "-kernel", str(probe)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        loop.run_until_complete(qmp.connect(wait_connect(path, proc)))
        took = (time.perf_counter() - start) * 1e3
        if qmp.greeting is None:            # qemu.qmp raises ConnectError for one not well formed
            raise RuntimeError("QEMU sent no QMP greeting")
        loop.run_until_complete(qmp.disconnect())
    finally:
        loop.close()
        proc.kill()
        proc.wait()
    return took


def make_snapshot(d: Path, probe: Path) -> tuple[Path, Path]:
    sock = d / "snap.sock"
    proc = subprocess.Popen([*FIRECRACKER, "--api-sock", str(sock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    s = wait_connect(sock, proc)
    request(s, "PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": "probe.run=snapshot"})
    request(s, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    request(s, "PUT", "/actions", {"action_type": "InstanceStart"})
    while b"snap ready" not in proc.stdout.readline():
        pass
    request(s, "PATCH", "/vm", {"state": "Paused"})
    state, memory = d / "vm.state", d / "vm.mem"
    request(s, "PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(memory)})
    proc.kill()
    proc.wait()
    return state, memory


def load_round(d: Path, state: Path, memory: Path) -> float:
    sock = d / "load.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen([*FIRECRACKER, "--api-sock", str(sock)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = wait_connect(sock, proc)
    request(s, "GET", "/")                  # the VMM is imported and its API served
    before = time.perf_counter()
    backend = {"backend_type": "File", "backend_path": str(memory)}
    request(s, "PUT", "/snapshot/load", {"snapshot_path": str(state), "resume_vm": True,
                                         "mem_backend": backend})
    took = (time.perf_counter() - before) * 1e3
    proc.kill()
    proc.wait()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    common.prepare()
    probe = ROOT / "guest" / "probe.elf"
    rows: dict[str, list[float]] = {}

    def add(label: str, value: float) -> None:
        rows.setdefault(label, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        state, memory = make_snapshot(d, probe)
        config = d / "vm.json"
        config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(probe), "boot_args": CMDLINE},
                                      "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}))
        def api(i: int) -> None:
            for label, value in api_round(d, probe).items():
                add(label, value)

        rounds: list[Callable[[int], None]] = [
            api,
            lambda i: add("QEMU: process start to QMP greeting", qmp_ready(d, probe)),
            lambda i: add("snapshot/load (resume_vm) request", load_round(d, state, memory)),
            lambda i: add("boot to power-off, --config-file --no-api",
                          measure([*FIRECRACKER, "--no-api", "--config-file", str(config)])[0].wall_ms),
            lambda i: add("QEMU microvm: boot to power-off", measure(qemu_cmd(probe))[0].wall_ms),
        ]
        for i in range(args.runs + 1):       # round 0 warms the page cache and is dropped
            for one in rounds:
                one(i)
            if i == 0:
                rows.clear()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"altovirt-firecracker on the probe, median of {args.runs} runs (ms)")
    for label, value in med.items():
        print(f"  {label:48}{value:8.1f}")
    qmp = med["QEMU: process start to QMP greeting"]
    print(f"  API socket accepting / QEMU QMP greeting: {med['ready'] / qmp:.2f}; "
          f"first answer / QMP greeting: {med['first answer'] / qmp:.2f}")
    boot = med["boot to power-off, --config-file --no-api"] / med["QEMU microvm: boot to power-off"]
    print(f"  boot to power-off / QEMU microvm: {boot:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
