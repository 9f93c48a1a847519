#!/usr/bin/env python3
"""QMP latency: AltoVirt and QEMU microvm, the same probe guest, the same raw client.

* query-status round trip: median and p99 over --calls calls;
* stop + cont: the time until each reply, median over --pauses rounds, with
  1 and 4 vCPUs (the probe spins on the boot vCPU, the others are halted).

    .venv/bin/python bench/qmp.py [--calls 10000] [--pauses 50]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time

import common
from common import PROBE


class Client:
    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rb")
        self.f.readline()
        self.call("qmp_capabilities")

    def call(self, name: str, arguments: dict | None = None) -> dict:
        self.s.sendall(json.dumps({"execute": name, "arguments": arguments or {}}).encode() + b"\n")
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                return msg


def measure(cmd: list[str], path: str, calls: int, pauses: int) -> dict[str, float]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        c = Client(path)
        time.sleep(0.5)                                 # let the probe reach its wait loop
        rtt = []
        for _ in range(calls):
            t = time.perf_counter()
            c.call("query-status")
            rtt.append(time.perf_counter() - t)
        stops, conts = [], []
        for _ in range(pauses):
            t = time.perf_counter()
            assert "return" in c.call("stop")
            stops.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert "return" in c.call("cont")
            conts.append(time.perf_counter() - t)
        c.call("quit")
    finally:
        proc.kill()
        proc.wait()
    rtt.sort()
    return {"rtt_median": statistics.median(rtt) * 1e6, "rtt_p99": rtt[int(len(rtt) * 0.99)] * 1e6,
            "stop": statistics.median(stops) * 1e3, "cont": statistics.median(conts) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--pauses", type=int, default=50)
    args = ap.parse_args()
    qemu = common.qemu()
    common.prepare()
    alto = common.altovirt()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cpus in (1, 4):
            a_sock, q_sock = f"{d}/a{cpus}.sock", f"{d}/q{cpus}.sock"
            a = measure([*alto, "-kernel", str(PROBE), "-smp", str(cpus), "-append", "probe.run=smp,wait",
                         "-api-channel", f"unix:{a_sock}"], a_sock, args.calls, args.pauses)
            q = measure([qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                         "-m", "256M", "-smp", f"{cpus},sockets=1,cores={cpus}", "-nodefaults",
                         "-no-user-config", "-display", "none", "-serial", "null",
                         "-qmp", f"unix:{q_sock},server=on,wait=off", "-kernel", str(PROBE),
                         "-append", "probe.run=smp,wait"], q_sock, args.calls, args.pauses)
            rows.append((cpus, a, q))
    print(f"QMP latency: query-status over {args.calls} calls, stop/cont medians over {args.pauses} rounds")
    print(f"{'':36}{'AltoVirt':>10}{'QEMU':>10}{'ratio':>8}")
    for cpus, a, q in rows:
        for key, label, unit in (("rtt_median", "query-status median", "us"),
                                 ("rtt_p99", "query-status p99", "us"), ("stop", "stop", "ms"),
                                 ("cont", "cont", "ms")):
            name = f"{label} ({unit}), {cpus} vCPU"
            print(f"{name:36}{a[key]:10.1f}{q[key]:10.1f}{a[key] / q[key]:8.2f}")


if __name__ == "__main__":
    main()
