#!/usr/bin/env python3
"""vm-fork benchmark: one running probe VM (1 vCPU, 128 MiB, halted once up) forked N times in a
row through QMP.

Prints, medians and p99: how long the parent's guest stood still for each fork (its log's
"stood still" lines), and the time from the vm-fork request to its reply, which comes once the
child's vCPUs run; the forks per second that makes; then each idle child's PSS (/proc/PID/smaps),
split as bench/density.py splits it into the guest's RAM and the VMM's own memory. The children
share the parent's RAM and its interpreter's pages copy-on-write, which PSS divides among them.

    .venv/bin/python bench/fork.py [--counts 32,100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import common
from boot import altovirt_cmd
from common import PROBE
from density import CMDLINE, pss_kib
from qemu.qmp.legacy import QEMUMonitorProtocol


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def forks(count: int, d: Path) -> tuple[list[float], list[float], list[tuple[int, int]]]:
    """Fork a new parent ``count`` times: (pauses in ms, request-to-running in ms, PSS per child)."""
    sock, log = d / f"parent{count}.qmp", d / f"parent{count}.log"
    parent = subprocess.Popen(altovirt_cmd(PROBE, log, "-api-channel", f"unix:{sock}", cmdline=CMDLINE),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        while not sock.exists():
            if parent.poll() is not None:
                raise SystemExit("fork: the parent did not start")
            time.sleep(0.01)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        time.sleep(0.3)                 # the guest halted
        took = []
        for n in range(count):
            start = time.perf_counter()
            child = str(d / f"c{count}-{n}.qmp")
            reply = qmp.cmd_obj({"execute": "vm-fork", "arguments": {"api-channel": child}})
            took.append(1000 * (time.perf_counter() - start))
            if "return" not in reply:
                raise SystemExit(f"fork: {reply}")
            pids.append(reply["return"]["pid"])
        time.sleep(0.5)                 # idle
        pss = [pss_kib(pid) for pid in pids]
        pauses = [float(m) for m in re.findall(r"stood still for ([\d.]+) ms", log.read_text())]
        with contextlib.suppress(Exception):
            qmp.cmd_obj({"execute": "quit"})
            qmp.close()
        return pauses, took, pss
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="32,100")
    args = ap.parse_args()
    common.prepare()
    print(f"probe, 1 vCPU, 128 MiB, idle ({CMDLINE!r}); {os.cpu_count()} CPUs")
    print(f"{'forks':>6}{'pause ms (p99)':>18}{'to running ms (p99)':>22}{'forks/s':>9}{'PSS/child MiB':>15}"
          f"{'guest RAM':>11}{'VMM':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(c) for c in args.counts.split(",")):
            pauses, took, pss = forks(count, Path(tmp))
            ram = statistics.median(p[0] for p in pss) / 1024
            own = statistics.median(p[1] for p in pss) / 1024
            pause, running = statistics.median(pauses), statistics.median(took)
            print(f"{count:6}{pause:11.1f} ({p99(pauses):4.1f}){running:14.1f} ({p99(took):5.1f})"
                  f"{count / (sum(took) / 1000):9.1f}{ram + own:15.1f}{ram:11.1f}{own:7.1f}", flush=True)


if __name__ == "__main__":
    main()
