#!/usr/bin/env python3
"""Boot benchmark: the probe guest (1 vCPU, 128 MiB, ``info`` test) on AltoVirt and QEMU microvm.

For each VMM, over --runs boots, prints the median of:
  * wall time from process start to exit (the guest powers off at the end),
  * time from process start to the guest's first byte on the serial port,
  * AltoVirt's boot-timer value (the probe writes port 0x3ff at its entry point),
  * peak RSS of the VMM process (getrusage via wait4),
then the ratios AltoVirt / QEMU, and AltoVirt's start-up budget: the interpreter's own start,
then the phases AltoVirt logs (imports, configuration, build, services, vCPUs started), and
the guest's time from its first instruction to power-off. Runs alternate between the VMMs so that
machine noise hits both alike.

With --warm, AltoVirt also boots through a warm parent (``altovirt serve``, ALTOVIRT_SERVER):
the same command, its time from the client's start to its exit, against QEMU's.

    .venv/bin/python bench/boot.py [--runs 15] [--image guest/probe.elf] [--seccomp-cost] [--jail-cost]
                                   [--warm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import common
from common import ROOT

CMDLINE = "console=ttyS0 probe.run=info"


@dataclass
class Sample:
    wall_ms: float
    first_output_ms: float
    rss_kib: int
    boot_timer_ms: float | None = None


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[Sample, bytes]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = bytearray()
    first = None
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        if not ready:
            proc.kill()
            raise RuntimeError(f"{cmd[0]}: no output for 30 s")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        out += chunk
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if b"probe: done ok" not in out:
        raise RuntimeError(f"{cmd[0]}: the probe did not finish:\n{out.decode(errors='replace')}")
    return Sample((end - start) * 1000, ((first or end) - start) * 1000, usage.ru_maxrss), bytes(out)


def altovirt_cmd(image: Path, log: Path | None, *extra: str, cmdline: str = CMDLINE) -> list[str]:
    """The probe on AltoVirt, its log in ``log`` (None: no log)."""
    return [*common.altovirt(), "-kernel", str(image), "-smp", "1", "-m", "128M", "-append", cmdline,
            "-serial", "stdio", *(("-D", str(log)) if log else ()), *extra]


def jailed(image: Path, base: Path, *jail_options: str) -> Sample:
    """One boot through the jailer (its start-up included); the jail is cleaned afterwards."""
    jailer = [str(ROOT / ".venv" / "bin" / "altovirt-jailer"), "--id", "bench",
              "--chroot-base-dir", str(base)]
    sample, _ = measure([*jailer, "--uid", "4242", "--gid", "4242", *jail_options, "--source", str(image),
                         "--", "-kernel", image.name, "-smp", "1", "-m", "128M", "-append", CMDLINE,
                         "-serial", "stdio", "-D", "/vm.log"])
    subprocess.run([*jailer, "--clean"], check=True)
    return sample


def qemu_cmd(image: Path, cmdline: str = CMDLINE) -> list[str]:
    """The same machine on QEMU microvm (its last four words: the kernel and command line)."""
    # -cpu host,-arch-capabilities: PVM hosts refuse MSR_IA32_ARCH_CAPABILITIES.
    return [common.qemu(), "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(image), "-append", cmdline]


def budget(log: Path) -> dict[str, float]:
    """The start-up budget AltoVirt logged (-D): phase -> ms."""
    m = re.search(r"start-up: (.*)", log.read_text())
    if not m:
        raise RuntimeError("no start-up budget in the AltoVirt log")
    return {name: float(ms) for name, ms in (part.rsplit(" ", 2)[:2] for part in m.group(1).split(", "))}


def interpreter_ms() -> float:
    """The interpreter's own start (site included): what comes before AltoVirt's first import."""
    start = time.perf_counter()
    subprocess.run([*common.altovirt_python(), "-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1000


def boot_timer_ms(log: Path) -> float:
    m = re.search(r"boot timer: value=0x1 at ([\d.]+) ms", log.read_text())
    if not m:
        raise RuntimeError("no boot-timer mark in the AltoVirt log")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--image", type=Path, default=ROOT / "guest" / "probe.elf",
                    help="probe image; QEMU boots it through its PVH note")
    ap.add_argument("--seccomp-cost", action="store_true",
                    help="also boot AltoVirt with -disable-seccomp, to show what the filters cost")
    ap.add_argument("--jail-cost", action="store_true",
                    help="also boot AltoVirt through altovirt-jailer (as uid 4242), to show what the "
                         "jail costs (needs root)")
    ap.add_argument("--warm", action="store_true",
                    help="also boot AltoVirt through a warm parent (altovirt serve)")
    args = ap.parse_args()
    common.prepare()

    alto: list[Sample] = []
    qemu: list[Sample] = []
    budgets: list[dict[str, float]] = []
    # What AltoVirt costs with something changed: label -> samples.
    variants: dict[str, list[Sample]] = {}
    if args.seccomp_cost:
        variants["without seccomp"] = []
    if args.jail_cost:
        variants["jailed"] = []
        variants["jailed, new PID namespace"] = []
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        warm_env = None
        if args.warm:
            variants["through a warm parent"] = []
            sock = Path(d) / "warm.sock"
            stack.enter_context(warm_parent(sock))
            warm_env = dict(os.environ, ALTOVIRT_SERVER=str(sock))
        for i in range(args.runs + 1):          # run 0 warms the page cache and is dropped
            log = Path(d) / f"run{i}.log"
            a, _ = measure(altovirt_cmd(args.image, log))
            a.boot_timer_ms = boot_timer_ms(log)
            phases = {"interpreter and site": interpreter_ms(), **budget(log)}
            q, _ = measure(qemu_cmd(args.image))
            others = {}
            if args.seccomp_cost:
                others["without seccomp"], _ = measure(altovirt_cmd(args.image, log, "-disable-seccomp"))
            if warm_env is not None:
                others["through a warm parent"], _ = measure(altovirt_cmd(args.image, log), warm_env)
            if args.jail_cost:
                others["jailed"] = jailed(args.image, Path(d))
                others["jailed, new PID namespace"] = jailed(args.image, Path(d), "--new-pid-ns")
            if i:
                alto.append(a)
                qemu.append(q)
                budgets.append(phases)
                for label, sample in others.items():
                    variants[label].append(sample)

    def med(samples: list[Sample], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    print(f"probe {args.image.name}, 1 vCPU, 128 MiB, '{CMDLINE}', median of {args.runs} runs")
    print(f"{'':22}{'AltoVirt':>12}{'QEMU':>12}{'ratio':>10}")
    rows = [("boot to poweroff (ms)", "wall_ms"), ("first output (ms)", "first_output_ms"),
            ("peak RSS (MiB)", "rss_kib")]
    for label, attr in rows:
        ma, mq = med(alto, attr), med(qemu, attr)
        scale = 1024 if attr == "rss_kib" else 1
        print(f"{label:22}{ma / scale:12.1f}{mq / scale:12.1f}{ma / mq:10.2f}")
    # Every AltoVirt sample has its mark (boot_timer_ms() raises otherwise); QEMU has no such device.
    timers = [s.boot_timer_ms for s in alto if s.boot_timer_ms is not None]
    print(f"{'boot timer (ms)':22}{statistics.median(timers):12.1f}{'n/a':>12}{'':>10}")
    print("AltoVirt's start-up budget (ms, medians):")
    for phase in budgets[0]:
        print(f"  {phase:26}{statistics.median(b[phase] for b in budgets):8.1f}")
    print(f"  {'guest, entry to power-off':26}"
          f"{statistics.median(s.wall_ms - (s.boot_timer_ms or 0) for s in alto):8.1f}")
    ma, mq = med(alto, "wall_ms"), med(qemu, "wall_ms")
    for label, samples in variants.items():
        v = med(samples, "wall_ms")
        p99 = statistics.quantiles([s.wall_ms for s in samples], n=100)[98] if len(samples) > 1 else v
        print(f"boot to poweroff {label}: {v:.1f} ms, p99 {p99:.1f} ms "
              f"({v - ma:+.1f} ms against {ma:.1f} ms; {v / mq:.2f} of QEMU's)")


@contextlib.contextmanager
def warm_parent(sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``altovirt serve`` on ``sock`` while the block runs."""
    proc = subprocess.Popen([*common.altovirt(), "serve", "--socket", str(sock)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("altovirt serve did not start")
            time.sleep(0.01)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
