"""scripts/testbed: run one command in the nested test bed's L1 (tests/testbed/l1.py)."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import arch as arches
from .l1 import BED_FAILURE, DEFAULT_CPUS, DEFAULT_MEM, TIMEOUT, Result, run
from .watch import HEARTBEAT_CPU_LIMIT, HEARTBEAT_LIMIT, STALL_CPU_LIMIT

USAGE = f"""usage: scripts/testbed [--arch ARCH] [--timeout SECONDS] [--cpus N] [--mem SIZE] [--out DIR]
                       [--keep-log FILE] [--append PARAMS] [--no-retry] -- COMMAND [ARGS...]

Boot Debian's stock kernel in QEMU TCG with emulated AMD SVM (L1, a /dev/kvm with hardware
virtualization semantics) and run COMMAND there as root, in the current directory (shared
read-only on its own when it is under /tmp or /run, which are fresh tmpfs in L1).  L1's root
is the host's, read-only under a tmpfs overlay.  COMMAND sees CI and ALTOVIRT_* from this environment,
ALTOVIRT_TESTBED=1, HOME=/root, and TESTBED_OUT, a directory shared read-write at the same
path inside and outside (--out DIR, default a fresh /tmp/altovirt-out-*; printed at the end).
COMMAND's stdout and stderr are streamed here; L1's console goes to a log file, deleted
unless --keep-log FILE.

  --arch ARCH        x86_64 (default) or aarch64: Debian's arm64 kernel on QEMU's virt
                     machine with EL2 (KVM built in, VHE, vGICv3).  Its root is an arm64
                     Debian userland (busybox, python3 3.11 with pylibfdt, iproute2, socat);
                     the current directory, this repository and the test bed cache are
                     shared read-only (tmpfs overlays) at their own paths, and COMMAND also
                     gets PYTHONPATH=<repository>:<its .venv's site-packages> (run python3,
                     Debian's: the .venv is x86), PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 and
                     PYTEST_PLUGINS=pytest_timeout (the .venv's other plugins have x86 parts
                     or are slow to import under TCG; set them with -p).
                     aarch64-gicv2: the same on a virt machine whose GIC is a v2.
  --timeout SECONDS  limit for one attempt, boot included (default 3600)
  --cpus N           L1's vCPUs (default {DEFAULT_CPUS})
  --mem SIZE         L1's memory (default {DEFAULT_MEM})
  --out DIR          the shared output directory (created if missing)
  --keep-log FILE    keep L1's console log in FILE
  --append PARAMS    more parameters for L1's kernel command line
  --no-retry         do not boot L1 a second time after a wedge or crash

A wedged L1 (no heartbeat while its vCPU got {HEARTBEAT_CPU_LIMIT:.0f} s of CPU, or {STALL_CPU_LIMIT:.0f} s
after a soft lockup or RCU stall on its console, or no heartbeat for {HEARTBEAT_LIMIT:.0f} s at all)
is killed and booted once more; the line "testbed: L1 wedged (...), retrying once" says so,
with the CPU time L1 got in the silence.  A busy host only makes L1 slow: late heartbeats
are noted in the L1 log with the CPU time L1 got in between.

exit status: COMMAND's own; {TIMEOUT} if COMMAND did not finish within --timeout;
{BED_FAILURE} if the test bed failed (L1 did not boot, wedged twice, QEMU died), with a line
"testbed: ..." on stderr saying why; 130 if interrupted (SIGINT, SIGTERM, SIGHUP: L1 is
killed); 2 for a usage error.  COMMAND's own 124 or 125 is told apart by the "testbed:" line.
"""


@dataclass
class _Options:
    """Parsed command line of scripts/testbed."""

    command: list[str]
    arch: arches.Arch = arches.X86_64
    timeout: float = 3600.0
    cpus: int = DEFAULT_CPUS
    mem: str = DEFAULT_MEM
    out: str | None = None
    keep_log: str | None = None
    append: str = ""
    retry: bool = True


class HelpRequested(Exception):
    """``-h``/``--help`` was given."""


def parse_args(argv: Sequence[str]) -> _Options:
    """Parse scripts/testbed's arguments; raises ValueError with a one-line message, or
    :class:`HelpRequested`."""
    opts = _Options(command=[])
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.command = args
            break
        if arg in ("-h", "--help"):
            raise HelpRequested
        if arg == "--no-retry":
            opts.retry = False
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--arch", "--timeout", "--cpus", "--mem", "--out", "--keep-log", "--append"):
            raise ValueError(f"unknown option {arg!r} (COMMAND goes after --)")
        if not eq:
            if not args:
                raise ValueError(f"{name} needs a value")
            value = args.pop(0)
        if name == "--arch":
            opts.arch = arches.get(value)
        elif name == "--timeout":
            opts.timeout = _number(name, value, float)
        elif name == "--cpus":
            opts.cpus = _number(name, value, int)
        elif name == "--mem":
            opts.mem = value
        elif name == "--out":
            opts.out = value
        elif name == "--append":
            opts.append = value
        else:
            opts.keep_log = value
    if not opts.command:
        raise ValueError("no COMMAND (give it after --)")
    return opts


def interrupted(signum: int, _frame: object) -> None:
    """Signal handler: unwind like Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


_N = TypeVar("_N", int, float)


def _number(option: str, value: str, kind: Callable[[str], _N]) -> _N:
    """``value`` as a positive ``kind``; ValueError naming ``option`` otherwise."""
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{option}: {value!r} is not a positive number") from None
    if number <= 0:
        raise ValueError(f"{option}: {value!r} is not a positive number")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/testbed: run a command in L1; returns the exit status documented in USAGE."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except ValueError as err:
        sys.stderr.write(f"testbed: {err}\n{USAGE}")
        return 2
    if shutil.which(opts.arch.qemu) is None:
        _note(f"testbed: {opts.arch.qemu} not found (run ./scripts/setup, or apt-get install "
              f"{opts.arch.qemu_package})")
        return BED_FAILURE
    # A cancelled CI job sends SIGTERM: turn it into an exception so that the finally
    # clauses kill QEMU instead of leaving L1 running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        result = run(opts.command, timeout=opts.timeout, out_dir=opts.out, cpus=opts.cpus, mem=opts.mem,
                     log=opts.keep_log, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                     retry=opts.retry, append=opts.append, note=_note, arch=opts.arch)
    except KeyboardInterrupt as err:
        _note(f"testbed: interrupted ({err or 'SIGINT'}); L1 stopped")
        return 130
    _summarize(result, keep_log=opts.keep_log is not None, own_out=opts.out is None, qemu=opts.arch.qemu)
    return result.status


def _note(line: str) -> None:
    """Write one test bed message to stderr at once."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _summarize(result: Result, *, keep_log: bool, own_out: bool, qemu: str = arches.X86_64.qemu) -> None:
    """Print the end of L1's console after a test bed failure and a closing status line;
    delete the log unless ``keep_log``, and the output directory if ``own_out`` (we made
    it) and it stayed empty."""
    if result.status == BED_FAILURE and result.bed_error is not None:
        lines = result.l1_log.read_bytes()[-4000:].decode(errors="replace").splitlines()
        tail = [line for line in lines if not line.startswith(f"testbed: {qemu}")][-25:]
        _note("testbed: last lines of L1's console:\n  " + "\n  ".join(tail))
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "-"
    out = str(result.out_dir)
    if own_out and not any(result.out_dir.iterdir()):
        result.out_dir.rmdir()
        out += " (empty, removed)"
    nudged = result.nudges
    nudges = f", nudges {nudged.sent} (revived {nudged.revived})" if nudged.sent else ""
    _note(f"testbed: status {result.status}, L1 boot {boot}, total {result.seconds:.1f} s, "
          f"attempts {result.attempts}{nudges}, TESTBED_OUT={out}"
          + (f", L1 log {result.l1_log}" if keep_log else ""))
    if not keep_log:
        result.l1_log.unlink(missing_ok=True)
