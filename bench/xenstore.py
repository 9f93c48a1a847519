#!/usr/bin/env python3
"""XenStore throughput over the VMM's host socket: reads, writes and watch-event delivery,
with one client and with ten clients at once (each its own connection and thread; the
clients share this process's GIL, so ten of them measure the server under load rather
than ten independent processes).

Each client sends back-to-back requests (one outstanding at a time, as libxenstore
does). Watch delivery: one writer changes a key that every client watches; the figure
is events received per second, all clients together. Last, the guest's view: the
probe's xenstore test times its back-to-back writes over the vsock port, and QMP's
xenstore-read round trip is set beside query-status's, through bench/qmp.py's raw client:
qemu.qmp's own cost, 130-150 us of CPU a call (bench/qmp.py's docstring), would outweigh
both round trips.

    .venv/bin/python bench/xenstore.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import common
from qmp import Client as QmpClient

HEADER = struct.Struct("=IIII")
READ, WATCH, WRITE = 2, 4, 11


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    return s


def recv_message(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < HEADER.size:
        head += s.recv(HEADER.size - len(head))
    op, _, _, length = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return op, body


def hammer(path: Path, op: int, payload: bytes, seconds: float, counts: list[int], i: int) -> None:
    s = connect(path)
    message = HEADER.pack(op, 1, 0, len(payload)) + payload
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        s.sendall(message)
        recv_message(s)
        n += 1
    counts[i] = n
    s.close()


def ops_per_second(path: Path, clients: int, op: int, payload: bytes, seconds: float) -> float:
    counts = [0] * clients
    threads = [threading.Thread(target=hammer, args=(path, op, payload, seconds, counts, i))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def events_per_second(path: Path, clients: int, seconds: float) -> float:
    watchers = []
    for i in range(clients):
        s = connect(path)
        token = f"t{i}".encode()
        s.sendall(HEADER.pack(WATCH, 1, 0, 11 + len(token)) + b"/bench/ev\0" + token + b"\0")
        recv_message(s)            # OK
        recv_message(s)            # the initial event
        watchers.append(s)
    received = [0] * clients
    stop = threading.Event()

    def drain(i: int) -> None:
        watchers[i].settimeout(0.5)
        while not stop.is_set():
            try:
                op, _ = recv_message(watchers[i])
            except (TimeoutError, OSError):
                continue
            received[i] += op == 15
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    writer = connect(path)
    payload = b"/bench/ev\0x"
    message = HEADER.pack(WRITE, 1, 0, len(payload)) + payload
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        writer.sendall(message)
        recv_message(writer)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    for s in [*watchers, writer]:
        s.close()
    return sum(received) / seconds


def guest_writes_per_second(d: Path) -> str:
    """Run the probe's xenstore test (playing the host's part) and return its figure."""
    sock = d / "guest-xs.sock"
    vm = subprocess.Popen([*common.altovirt(), "-kernel", str(common.PROBE), "-append", "probe.run=xenstore",
                           "-serial", "stdio", "-xenstore", str(sock), "-xen-domid", "7",
                           "-device", f"vsock,id=vsock0,guest-cid=3,uds-path={d / 'v.sock'}"],
                          stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert vm.stdout is not None
    figure = "?"
    for line in vm.stdout:
        if "probe: xenstore watching" in line:
            host = connect(sock)
            for payload in (b"/local/domain/7/config/name\0bench", b"/local/domain/7/config/ready\x001"):
                host.sendall(HEADER.pack(WRITE, 1, 0, len(payload)) + payload)
                recv_message(host)
            host.close()
        elif "guest writes/s=" in line:
            figure = line.strip().rsplit("=", 1)[1]
    vm.wait()
    return figure


def qmp_round_trips(path: Path, calls: int) -> dict[str, float]:
    """Median round trip (µs) of xenstore-read and of query-status, interleaved."""
    client = QmpClient(str(path))
    client.call("xenstore-write", {"path": "/bench/qmp", "value": "v"})
    times: dict[str, list[float]] = {"xenstore-read": [], "query-status": []}
    for _ in range(calls):
        for name, arguments in (("xenstore-read", {"path": "/bench/qmp"}), ("query-status", None)):
            t0 = time.perf_counter()
            client.call(name, arguments)
            times[name].append(time.perf_counter() - t0)
    client.close()
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--calls", type=int, default=5000, help="QMP round trips of each command")
    args = ap.parse_args()
    common.prepare()
    with tempfile.TemporaryDirectory() as d:
        sock = Path(d) / "xs.sock"
        vm = subprocess.Popen([*common.altovirt(), "-kernel", str(common.PROBE), "-append", "probe.run=wait",
                               "-serial", "stdio", "-xenstore", str(sock),
                               "-api-channel", f"unix:{Path(d) / 'qmp.sock'}"],
                              stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            while not sock.exists():
                time.sleep(0.05)
            ops_per_second(sock, 1, WRITE, b"/bench/key\0value", 0.5)    # creates the key; warms up
            print(f"XenStore over the host socket, {args.seconds:.0f} s each")
            print(f"{'':28}{'1 client':>12}{'10 clients':>12}")
            for label, op, payload in (("read (ops/s)", READ, b"/bench/key\0"),
                                       ("write (ops/s)", WRITE, b"/bench/key\0value")):
                one = ops_per_second(sock, 1, op, payload, args.seconds)
                ten = ops_per_second(sock, 10, op, payload, args.seconds)
                print(f"{label:28}{one:12.0f}{ten:12.0f}")
            one = events_per_second(sock, 1, args.seconds)
            ten = events_per_second(sock, 10, args.seconds)
            print(f"{'watch events (events/s)':28}{one:12.0f}{ten:12.0f}")
            rtt = qmp_round_trips(Path(d) / "qmp.sock", args.calls)
            print(f"QMP median round trip: xenstore-read {rtt['xenstore-read']:.0f} us, "
                  f"query-status {rtt['query-status']:.0f} us")
        finally:
            vm.terminate()
            vm.wait()
        print(f"{'guest writes over vsock':28}{guest_writes_per_second(Path(d)):>12} (ops/s, 1 connection)")


if __name__ == "__main__":
    main()
