#!/usr/bin/env python3
"""Network benchmark: frames per second the probe transmits through virtio-net.

The probe (1 vCPU) keeps 64 minimum-size frames in flight on the transmit
queue and counts how many the device takes per second (TSC, calibrated from
kvmclock). The tap lives in a network namespace this script creates; the
host kernel drops the frames (an EtherType nobody handles), so the figure
is the VMM's transmit path. Rounds alternate between AltoVirt and QEMU
microvm; medians and the ratio are printed. Needs root.

    .venv/bin/python bench/net.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess

import common
from common import PROBE


def run(ns: str, cmd: list[str], who: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                         timeout=300).stdout
    m = re.search(r"probe: netbench tx-frames=\d+ fps=(\d+)", out)
    if not m or "probe: test netbench ok" not in out:
        raise SystemExit(f"bench: {who}: netbench failed:\n{out}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    qemu = common.qemu()
    common.prepare()
    alto_cmd = [*common.altovirt(), "-kernel", str(PROBE), "-netdev", "id=n0,netdev=tap0",
                "-append", "probe.run=netbench",
                 "-serial", "stdio"]
    qemu_cmd = [qemu, "-M", "microvm,acpi=off,auto-kernel-cmdline=on",
                "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm",
                "-cpu", "host,-arch-capabilities", "-m", "256M", "-nodefaults", "-no-user-config",
                "-nographic", "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4",
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", "virtio-net-device,netdev=n0", "-kernel", str(PROBE),
                "-append", "probe.run=netbench"]
    ns = f"altovirt-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "tap0", "up"], check=True)
        alto: list[int] = []
        qem: list[int] = []
        for i in range(args.rounds + 1):
            a, q = run(ns, alto_cmd, "AltoVirt"), run(ns, qemu_cmd, "QEMU")
            if i:                       # round 0 warms up
                alto.append(a)
                qem.append(q)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    ma, mq = statistics.median(alto), statistics.median(qem)
    print(f"probe netbench, 64-byte frames, 64 in flight, median of {args.rounds} rounds")
    print(f"{'':28}{'AltoVirt':>10}{'QEMU':>10}{'ratio':>8}")
    print(f"{'transmit, frames/s':28}{ma:10.0f}{mq:10.0f}{ma / mq:8.2f}")


if __name__ == "__main__":
    main()
