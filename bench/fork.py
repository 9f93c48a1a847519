#!/usr/bin/env python3
"""vm-fork benchmark: one running probe VM (1 vCPU, 128 MiB, halted once up) forked N times
through QMP, one fork after another on one connection, then N at once (N connections, each
asking once, all together).

Prints, medians and p99: how long the parent's guest stood still for each fork (its log's
"stood still" lines), and the time from the vm-fork request to its reply, which comes once the
child's vCPUs run; the forks per second that makes; then each idle child's PSS (/proc/PID/smaps),
split as bench/density.py splits it into the guest's RAM and the VMM's own memory. The children
share the parent's RAM and its interpreter's pages copy-on-write, which PSS divides among them.
For N at once: the time from the first request to the last reply, and the forks per second.

    .venv/bin/python bench/fork.py [--counts 32,100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
from boot import altovirt_cmd
from common import PROBE
from density import CMDLINE, pss_kib
from qemu.qmp.legacy import QEMUMonitorProtocol


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def child_pid(reply: dict[str, Any]) -> int:
    """The pid a vm-fork reply gives; SystemExit with the reply if it is an error."""
    if "return" not in reply:
        raise SystemExit(f"fork: {reply}")
    return int(reply["return"]["pid"])


def fork(qmp: QEMUMonitorProtocol, child: Path) -> int:
    return child_pid(qmp.cmd_obj({"execute": "vm-fork", "arguments": {"api-channel": str(child)}}))


def raw_fork(sock: Path, child: Path, start: threading.Barrier) -> int:
    """vm-fork on a QMP connection of its own, made here (qemu.qmp's legacy client is bound to
    the event loop of the thread that made it), once every other connection is ready too."""
    with socket.socket(socket.AF_UNIX) as s, s.makefile("rw") as f:
        s.connect(str(sock))
        f.readline()                                    # the greeting
        for command in ({"execute": "qmp_capabilities"},
                        {"execute": "vm-fork", "arguments": {"api-channel": str(child)}}):
            if command["execute"] == "vm-fork":
                start.wait()
            f.write(json.dumps(command) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                pass                                    # an event
        return child_pid(reply)


def at_once(sock: Path, count: int, d: Path, pids: list[int]) -> float:
    """Seconds from the first of ``count`` vm-fork requests, one on each of as many QMP
    connections, to the last reply; the children's pids go into ``pids``."""
    start = threading.Barrier(count + 1)
    with ThreadPoolExecutor(count) as pool:
        done = [pool.submit(raw_fork, sock, d / f"a{count}-{n}.qmp", start) for n in range(count)]
        start.wait()
        began = time.perf_counter()
        pids += [f.result() for f in done]
        return time.perf_counter() - began


def forks(count: int, d: Path) -> tuple[list[float], list[float], list[tuple[int, int]], float]:
    """Fork a new parent ``count`` times, then ``count`` at once: (pauses in ms,
    request-to-running in ms, PSS per child, seconds for those at once)."""
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
            pids.append(fork(qmp, d / f"c{count}-{n}.qmp"))
            took.append(1000 * (time.perf_counter() - start))
        time.sleep(0.5)                 # idle
        pss = [pss_kib(pid) for pid in pids]
        pauses = [float(m) for m in re.findall(r"stood still for ([\d.]+) ms", log.read_text())]
        together = at_once(sock, count, d, pids)
        with contextlib.suppress(Exception):
            qmp.cmd_obj({"execute": "quit"})
            qmp.close()
        return pauses, took, pss, together
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
          f"{'guest RAM':>11}{'VMM':>7}{'at once s':>11}{'forks/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(c) for c in args.counts.split(",")):
            pauses, took, pss, together = forks(count, Path(tmp))
            ram = statistics.median(p[0] for p in pss) / 1024
            own = statistics.median(p[1] for p in pss) / 1024
            pause, running = statistics.median(pauses), statistics.median(took)
            print(f"{count:6}{pause:11.1f} ({p99(pauses):4.1f}){running:14.1f} ({p99(took):5.1f})"
                  f"{count / (sum(took) / 1000):9.1f}{ram + own:15.1f}{ram:11.1f}{own:7.1f}"
                  f"{together:11.2f}{count / together:9.1f}", flush=True)


if __name__ == "__main__":
    main()
