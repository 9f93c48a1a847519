#!/usr/bin/env python3
"""Snapshot, restore and live migration benchmark: the probe guest (2 vCPUs, 512 MiB, its
``snapshot`` test rewriting 64 MiB) on AltoVirt and on QEMU microvm, same host, same guest.

For each VMM, over --runs rounds (alternating VMMs), prints the median of:
  * save: a paused VM to a file (AltoVirt ``migrate file:DIR``; QEMU ``migrate exec:cat > FILE``),
    and the snapshot's size on disk,
  * restore: from ``migrate-incoming`` (to a process started with ``-incoming defer`` SETTLE
    seconds before) to the RESUME event (AltoVirt ``file:DIR`` with
    ``resume``, memory mapped or copied; QEMU ``exec:cat FILE``, query-migrate until
    completed, then ``cont``), and from process start to running (polled with query-status),
  * live migration over a unix socket (both unlimited bandwidth, 300 ms downtime limit):
    total time and downtime as each VMM's query-migrate reports them,
then the ratios AltoVirt / QEMU.

    .venv/bin/python bench/snapshot.py [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common
from common import PROBE
from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

CMDLINE = "console=ttyS0 probe.run=snapshot"
DIRTY = "dirty 16384\n"          # 64 MiB the guest keeps rewriting
# -incoming defer: the process has started and waits; the restore figure is the load alone,
# not the end of the VMM's own start-up (its threads still loading their seccomp filters).
SETTLE = 0.3


STARTED: list[subprocess.Popen[bytes]] = []            # killed at the end, whatever happens


class Vmm:
    """A VMM process running the probe, its serial console and its QMP monitor."""

    def __init__(self, argv: list[str], sock: Path, *, wait_ready: bool = True) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        STARTED.append(self.proc)
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() - self.started > 30:
                raise SystemExit(f"bench: {argv[0]} did not start")
            time.sleep(0.001)
        while True:                     # QEMU's socket file exists a moment before it listens
            self.qmp = QEMUMonitorProtocol(str(sock))
            try:
                self.qmp.connect()
                break
            except ConnectError:
                if time.monotonic() - self.started > 30:
                    raise
                time.sleep(0.001)
        if wait_ready:
            self.wait_output(b"probe: snap ready")
            self.type(DIRTY)
            self.wait_output(b"probe: snap dirty")
            time.sleep(0.5)             # every page of the 64 MiB written at least once

    def wait_output(self, text: bytes) -> None:
        assert self.proc.stdout is not None
        while text not in self.proc.stdout.readline():
            pass

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def cmd(self, name: str, **args: object) -> Any:
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args})
        if "return" not in reply:
            raise SystemExit(f"bench: {name}: {reply}")
        return reply["return"]

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_status(self, status: str) -> float:
        while self.status() != status:
            pass
        return time.monotonic()

    def event(self, name: str) -> float:
        """When the next ``name`` event arrived."""
        while self.qmp.pull_event(wait=True)["event"] != name:    # type: ignore[index]
            pass
        return time.monotonic()

    def migration(self) -> dict[str, Any]:
        while (info := self.cmd("query-migrate")).get("status") not in ("completed", "failed"):
            time.sleep(0.002)
        if info["status"] != "completed":
            raise SystemExit(f"bench: migration failed: {info}")
        return dict(info)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cmd("quit")
        with contextlib.suppress(Exception):
            self.qmp.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def altovirt_argv(sock: Path, *extra: str) -> list[str]:
    return [*common.altovirt(), "-kernel", str(PROBE), "-smp", "2", "-m", "512M", "-append", CMDLINE,
            "-serial", "stdio", "-api-channel", f"unix:{sock}", *extra]


def qemu_argv(sock: Path, *extra: str) -> list[str]:
    return [common.qemu(), "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", "512M", "-smp", "2", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", str(PROBE), "-append", CMDLINE, "-qmp", f"unix:{sock},server=on,wait=off", *extra]


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="altovirt-bench-snap-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in ([path] if path.is_file() else path.iterdir()))


def save(src: Vmm, uri: str, snapshot: Path) -> dict[str, float]:
    """Pause ``src``, save it to ``uri`` (which writes ``snapshot``), quit it: the time and size."""
    src.cmd("stop")
    t = time.monotonic()
    src.cmd("migrate", uri=uri)
    src.migration()
    out = {"save_ms": (time.monotonic() - t) * 1000, "size_mib": disk_usage(snapshot) / (1 << 20)}
    src.close()
    return out


def round_altovirt(d: Path, mem: str) -> dict[str, float]:
    out = save(Vmm(altovirt_argv(d / "a.sock"), d / "a.sock"), f"file:{d / 'snap'}", d / "snap")
    waiting = Vmm(altovirt_argv(d / "b.sock", "-incoming", "defer"), d / "b.sock", wait_ready=False)
    time.sleep(SETTLE)
    t = time.monotonic()
    waiting.cmd("migrate-incoming", uri=f"file:{d / 'snap'}", resume=True, mem=mem)
    out["restore_ms"] = (waiting.event("RESUME") - t) * 1000
    waiting.close()
    started = Vmm(altovirt_argv(d / "c.sock", "-incoming", f"file:{d / 'snap'},resume=on,mem={mem}"),
                  d / "c.sock", wait_ready=False)
    out["start_to_running_ms"] = (started.wait_status("running") - started.started) * 1000
    started.close()
    out.update(live(altovirt_argv, d))
    return out


def round_qemu(d: Path) -> dict[str, float]:
    out = save(Vmm(qemu_argv(d / "a.sock"), d / "a.sock"), f"exec:cat > {d / 'snap.qemu'}", d / "snap.qemu")
    waiting = Vmm(qemu_argv(d / "b.sock", "-incoming", "defer"), d / "b.sock", wait_ready=False)
    time.sleep(SETTLE)
    t = time.monotonic()
    waiting.cmd("migrate-incoming", uri=f"exec:cat {d / 'snap.qemu'}")
    waiting.migration()                 # (QEMU sends MIGRATION events only with that capability)
    waiting.cmd("cont")
    out["restore_ms"] = (waiting.event("RESUME") - t) * 1000
    waiting.close()
    # The snapshot is of a paused VM, which QEMU keeps paused once loaded: cont, as soon as it is.
    started = Vmm(qemu_argv(d / "c.sock", "-incoming", f"exec:cat {d / 'snap.qemu'}"), d / "c.sock",
                  wait_ready=False)
    started.migration()
    started.cmd("cont")
    out["start_to_running_ms"] = (started.wait_status("running") - started.started) * 1000
    started.close()
    out.update(live(qemu_argv, d))
    return out


def live(argv: Callable[..., list[str]], d: Path) -> dict[str, float]:
    uri = f"unix:{d / 'mig.sock'}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d / "mig.sock")
    src = Vmm(argv(d / "l1.sock"), d / "l1.sock")
    dst = Vmm(argv(d / "l2.sock", "-incoming", uri), d / "l2.sock", wait_ready=False)
    while not (d / "mig.sock").exists():
        time.sleep(0.001)
    src.cmd("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 10 << 30})
    src.cmd("migrate", uri=uri)
    info = src.migration()
    src.close()
    dst.close()
    for name in ("l1.sock", "l2.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
    return {"live_total_ms": info["total-time"], "live_downtime_ms": info["downtime"],
            "live_mib": info["ram"]["transferred"] / (1 << 20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    opts = ap.parse_args()
    common.prepare()
    results: dict[str, list[dict[str, float]]] = {"altovirt-map": [], "altovirt-copy": [], "qemu": []}
    try:
        for _ in range(opts.runs):
            for name in results:
                with workdir() as d:
                    one = round_qemu(d) if name == "qemu" else round_altovirt(d, name.split("-")[1])
                    results[name].append(one)
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    keys = list(results["qemu"][0])
    med = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    print(f"{'median of ' + str(opts.runs):24}" + "".join(f"{k:>22}" for k in keys))
    for name, m in med.items():
        print(f"{name:24}" + "".join(f"{m[k]:>22.1f}" for k in keys))
    for name in ("altovirt-map", "altovirt-copy"):
        print(f"{name + ' / qemu':24}" + "".join(
            f"{med[name][k] / med['qemu'][k] if med['qemu'][k] else float('nan'):>22.2f}" for k in keys))


if __name__ == "__main__":
    main()
