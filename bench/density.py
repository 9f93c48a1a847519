#!/usr/bin/env python3
"""Density benchmark: N probe VMs (1 vCPU, 128 MiB, halted once up) started at once, cold and through
a warm parent (``altovirt serve``), and QEMU microvm's for comparison.

For each way and each N, prints how long until every guest runs (its ``probe: idle`` line)
and the VMs per second that makes, then each idle VMM's PSS (/proc/PID/smaps), split into the
guest's RAM (the mapping that holds it) and the VMM's own memory: what a host pays per VM
beyond what its guest wrote. Children of a warm parent share its imported modules copy-on-write,
which PSS divides among them.

    .venv/bin/python bench/density.py [--counts 32,100] [--runs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import common
from boot import altovirt_cmd, qemu_cmd, warm_parent
from common import PROBE

MEM_MIB = 128                   # boot.py's machines' RAM: the mapping PSS counts as the guest's
CMDLINE = "console=ttyS0 probe.run=idle"


def argv(way: str) -> list[str]:
    """boot.py's machine, on QEMU or AltoVirt."""
    return qemu_cmd(PROBE, CMDLINE) if way == "qemu" else altovirt_cmd(PROBE, None, cmdline=CMDLINE)


def pss_kib(pid: int) -> tuple[int, int]:
    """(guest RAM, everything else) PSS in KiB of process ``pid``."""
    ram = other = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
                if size >= MEM_MIB << 10:
                    ram += pss
                else:
                    other += pss
    return ram, other


def vmm_pids(procs: list[subprocess.Popen[bytes]], warm: int | None) -> list[int]:
    """The VMM processes: the warm parent's children, or the processes themselves."""
    if warm is None:
        return [p.pid for p in procs]
    return [int(pid) for pid in Path(f"/proc/{warm}/task/{warm}/children").read_text().split()]


def storm(way: str, count: int, env: dict[str, str], warm: int | None) -> tuple[float, list[tuple[int, int]]]:
    """Start ``count`` VMs at once; (seconds until every guest runs, PSS of each VMM)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(argv(way), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env) for _ in range(count)]
    try:
        waiting: dict[int, bytes] = {p.stdout.fileno(): b"" for p in procs if p.stdout is not None}
        deadline = time.monotonic() + 120
        while waiting:
            if time.monotonic() > deadline:
                raise SystemExit(f"density: {len(waiting)} of {count} {way} guests never ran")
            ready, _, _ = select.select(list(waiting), [], [], 1)
            for fd in ready:
                waiting[fd] += os.read(fd, 65536)
                if b"probe: idle" in waiting[fd]:
                    del waiting[fd]
        elapsed = time.perf_counter() - start
        time.sleep(0.5)                 # idle
        return elapsed, [pss_kib(pid) for pid in vmm_pids(procs, warm)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="32,100")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    common.prepare()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as d:
        sock = Path(d) / "warm.sock"
        with warm_parent(sock) as server:
            ways = {"altovirt": (dict(os.environ), None),
                    "altovirt, warm parent": (dict(os.environ, ALTOVIRT_SERVER=str(sock)), server.pid),
                    "qemu": (dict(os.environ), None)}
            print(f"probe, 1 vCPU, {MEM_MIB} MiB, idle ({CMDLINE!r}); {os.cpu_count()} CPUs; "
                  f"median of {args.runs} run(s)")
            print(f"{'':24}{'VMs':>5}{'all running (s)':>17}{'VMs/s':>8}{'PSS/VM (MiB)':>14}"
                  f"{'guest RAM':>11}{'VMM':>8}")
            for count in counts:
                for way, (env, warm) in ways.items():
                    results = [storm(way, count, env, warm) for _ in range(args.runs)]
                    secs = statistics.median(r[0] for r in results)
                    pss = [p for r in results for p in r[1]]
                    ram = statistics.median(p[0] for p in pss) / 1024
                    own = statistics.median(p[1] for p in pss) / 1024
                    print(f"{way:24}{count:5}{secs:17.2f}{count / secs:8.1f}{ram + own:14.1f}{ram:11.1f}"
                          f"{own:8.1f}", flush=True)


if __name__ == "__main__":
    main()
