#!/usr/bin/env python3
"""Block benchmark: the probe's blkbench on AltoVirt and QEMU microvm, same image, same flags.

The probe (1 vCPU, 256 MiB) measures with the TSC, calibrated from kvmclock:
sequential 1 MiB writes and reads over 256 MiB (MB/s, 4 requests in flight)
and 4 KiB random reads at queue depth 1 and 32 (IOPS) over a 1 GiB image.
Both VMMs open the image with O_DIRECT (AltoVirt direct=on, QEMU
cache.direct=on). The host's own storage is virtual here and much faster
for regions read recently, so the first round only warms it and is dropped;
the rounds then alternate between the VMMs and the medians are compared.

Both VMMs back guest RAM with anonymous memory advised for transparent huge
pages, so direct I/O lands in memory alike.

    .venv/bin/python bench/block.py [--rounds 5] [--image /var/tmp/altovirt-bench.img] [--aio io_uring]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
from pathlib import Path

import common
from common import PROBE

METRICS = [("seq-write-MBps", "sequential write, MB/s", 0.8), ("seq-read-MBps", "sequential read, MB/s", 0.8),
           ("rand4k-qd1-iops", "4 KiB random read QD1, IOPS", None),
           ("rand4k-qd32-iops", "4 KiB random read QD32, IOPS", 0.5)]


def make_image(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def parse(out: str, who: str) -> dict[str, int]:
    m = re.search(r"probe: blkbench (.*)", out)
    if not m or "probe: test blkbench ok" not in out:
        raise SystemExit(f"bench: {who}: blkbench failed:\n{out}")
    return {k: int(v) for k, v in (w.split("=") for w in m.group(1).split())}


def altovirt(image: Path, aio: str) -> dict[str, int]:
    cmd = [*common.altovirt(), "-kernel", str(PROBE), "-m", "256M",
           "-drive", f"id=d0,file={image},direct=on,aio={aio}",
            "-append", "probe.run=blkbench", "-serial", "stdio"]
    return parse(subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout, "AltoVirt")


def qemu(image: Path, aio: str) -> dict[str, int]:
    cmd = [common.qemu(), "-M", "microvm,acpi=off,auto-kernel-cmdline=on",
           "-global", "virtio-mmio.force-legacy=false",
           "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256M", "-nodefaults", "-no-user-config",
           "-nographic", "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4",
           "-drive", f"file={image},if=none,id=d0,format=raw,cache.direct=on,aio={aio}",
           "-device", "virtio-blk-device,drive=d0", "-kernel", str(PROBE), "-append", "probe.run=blkbench"]
    return parse(subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout, "QEMU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", type=Path, default=Path("/var/tmp/altovirt-bench.img"))
    ap.add_argument("--aio", choices=("threads", "io_uring"), default="threads",
                    help="both VMMs' engine: their thread pools, or io_uring (AltoVirt's io_engine Async)")
    args = ap.parse_args()
    common.prepare()
    make_image(args.image, 1 << 30)
    runs = {"AltoVirt": lambda: altovirt(args.image, args.aio), "QEMU": lambda: qemu(args.image, args.aio)}
    results: dict[str, list[dict[str, int]]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(args.rounds + 1):
        for name in order[i % 2:] + order[:i % 2]:     # take turns at going first
            r = runs[name]()
            if i:
                results[name].append(r)
    print(f"probe blkbench, 1 GiB image, O_DIRECT, aio={args.aio}, median of {args.rounds} alternating "
          "rounds (after a warm-up)")
    print(f"{'':30}{'AltoVirt':>9}{'QEMU':>9}{'ratio':>7}  target")
    for key, label, target in METRICS:
        a, q = (statistics.median(r[key] for r in results[n]) for n in order)
        goal = f">= {target}" if target else ""
        print(f"{label:30}{a:9.0f}{q:9.0f}{a / q:7.2f}  {goal}")

if __name__ == "__main__":
    main()
