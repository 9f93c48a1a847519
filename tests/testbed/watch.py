"""Watching L1 from the host: how much CPU it got, whether it is slow or wedged, and QEMU's
monitor for evidence and nudges.

L1 is judged by the CPU time QEMU's vCPU thread got, not by the clock: a host busy with other
work makes L1 slow, never wedged.  :class:`Watch` holds what one boot has shown so far (its
console, control lines, heartbeats) and says when L1 should be nudged or counts as wedged;
tests/testbed/l1.py acts on that.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .arch import X86_64

# When L1 counts as wedged.  Silence is measured in the CPU time QEMU's vCPU thread got, not in
# wall time: on a busy host (package installs, a second QEMU, a CPU hog on every core) the
# vCPU gets a quarter of a core or less, and L1 is then slow, not stuck.  What a wedge looks
# like, measured (issue 24): the vCPU thread runnable all along and burning whatever CPU the
# host gives it, QEMU's main loop idle (no timer of L1's fires any more), nothing on the console
# or the control port.  A healthy L1 sends a heartbeat every 5 s of wall time, so at most
# about 5 s of vCPU time apart; the limits below are many times that.  The wall-clock limits
# are a backstop for an L1 that stopped without burning CPU (a vCPU halted for good).
BOOT_CPU_LIMIT = 120.0          # vCPU s from QEMU's start to "ready" (a boot takes about 8)
BOOT_LIMIT = 1200.0             # wall s for the same
HEARTBEAT_CPU_LIMIT = 120.0     # vCPU s without a heartbeat
HEARTBEAT_LIMIT = 900.0         # wall s for the same
STALL_CPU_LIMIT = 45.0          # vCPU s without a heartbeat once the console reported a lockup
NUDGE_CPU_LIMIT = 20.0          # vCPU s without a heartbeat before L1 is nudged (see NUDGE)
NUDGE_LIMIT = 60.0              # wall s for the same (a halted vCPU burns no CPU)
SLOW_HEARTBEAT = 15.0           # wall s: a heartbeat later than this is noted in the L1 log
# The nice value of L1's QEMU, where we may raise priorities (root): a host busy with other
# work then still gives L1's vCPU most of a core.  Measured with stress-ng --cpu 2 beside full
# bed runs (issue 24): at nice 0, and before guest waits allowed for stolen time, 3 and 2 of 7
# modules failed on timeouts inside L1; at -10 the runs passed.
NICE = -10
WEDGE_PATTERNS = re.compile(rb"soft lockup|hard LOCKUP|rcu.{0,40}stall|hung_task|blocked for more than")

# In the output directory: how long L1's vCPU waited for a host CPU so far (s), rewritten
# every second; exported as TESTBED_STEAL (tests/testbed/guest.py stretches its waits by it).
STEAL_FILE = ".testbed-steal"
# Asked of the monitor when an x86 L1 wedged, into the L1 log, and what it is told to nudge a
# silent one (why: tests/testbed/arch.py); each architecture has its own (Watch.queries).
WEDGE_QUERIES = X86_64.wedge_queries
NUDGE = X86_64.nudge
MONITOR_NOISE = (b"FPR", b"YMM", b"XMM", b"FCW", b"DR")     # register lines that tell nothing here


@dataclass(frozen=True)
class CpuSample:
    """What QEMU's threads had of the host's CPUs at one moment, in seconds since QEMU
    started: ``vcpus`` the CPU time of each vCPU thread, ``waited`` how long they were runnable
    but waited for a host CPU (schedstat; 0 where the kernel does not keep it), ``qemu`` the
    whole process's CPU time."""

    vcpus: tuple[float, ...]
    waited: float
    qemu: float

    def ran_since(self, then: CpuSample) -> float:
        """The most CPU time any one vCPU thread got since ``then``: a wedged vCPU spins
        while the others may sleep, so the busiest one is the measure."""
        if len(then.vcpus) != len(self.vcpus):
            return max(self.vcpus, default=0.0) - max(then.vcpus, default=0.0)
        return max((a - b for a, b in zip(self.vcpus, then.vcpus, strict=True)), default=0.0)

    def since(self, then: CpuSample) -> str:
        """How the vCPU threads fared since ``then``, for a log line or message."""
        return (f"its vCPU ran {self.ran_since(then):.1f} s and waited {self.waited - then.waited:.1f} s "
                f"for a host CPU, QEMU ran {self.qemu - then.qemu:.1f} s")


ZERO = CpuSample((), 0.0, 0.0)      # QEMU before it ran


class CpuClock:
    """The CPU time QEMU's vCPU threads got, read from /proc: the measure of how much L1
    could do, which a busy host can make far smaller than the wall time that passed.

    The vCPU threads are the ones QEMU names ``CPU n/TCG`` (``-name debug-threads=on``);
    without them (another QEMU build) the whole process stands in for them.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = float(os.sysconf("SC_CLK_TCK"))
        self._vcpus: list[str] = []     # /proc/PID/task/TID of each vCPU thread, once seen

    def _ticks(self, path: str) -> float:
        """utime + stime from a /proc stat file, in seconds (the name may hold spaces)."""
        with open(f"{path}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return (float(fields[11]) + float(fields[12])) / self.tick

    @staticmethod
    def _waited(path: str) -> float:
        """Seconds the thread was runnable but not running (schedstat's run_delay), or 0."""
        try:
            with open(f"{path}/schedstat") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def _find_vcpus(self) -> list[str]:
        tasks = f"/proc/{self.pid}/task"
        found = []
        for tid in sorted(os.listdir(tasks), key=int):
            with open(f"{tasks}/{tid}/comm") as f:
                if f.read().strip().endswith("/TCG"):
                    found.append(f"{tasks}/{tid}")
        return found

    def read(self) -> CpuSample | None:
        """The CPU time so far, or None once QEMU is gone."""
        try:
            if not self._vcpus:
                self._vcpus = self._find_vcpus()     # they appear once QEMU has set up
            qemu = self._ticks(f"/proc/{self.pid}")
            paths = self._vcpus or [f"/proc/{self.pid}"]
            return CpuSample(tuple(self._ticks(p) for p in paths), sum(self._waited(p) for p in paths), qemu)
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class Nudges:
    """How often a silent L1 was nudged (:data:`NUDGE`), and how often its heartbeat came back."""

    sent: int = 0
    revived: int = 0


@dataclass
class Watch:
    """The state of one L1 boot as seen from the host."""

    log: BinaryIO
    stdout: BinaryIO | None
    stderr: BinaryIO | None
    started: float = field(default_factory=time.monotonic)
    output: bytearray = field(default_factory=bytearray)
    ready: float | None = None
    heartbeat: float | None = None
    stall: bytes | None = None          # the first console line reporting a lockup or stall
    stall_at: float | None = None
    status: int | None = None
    fail: str | None = None
    exited_at: float | None = None
    console_tail: bytes = b""
    ctl_buf: bytes = b""
    qemu_err: bytes = b""
    clock: CpuClock | None = None
    monitor: Path | None = None         # QEMU's monitor socket
    steal_file: Path | None = None      # where to keep L1's stolen time (STEAL_FILE)
    steal_at: float = 0.0               # when it was last written
    nudged: float | None = None         # the heartbeat (or start) after which L1 was nudged
    note: Callable[[str], None] | None = None   # run()'s note, for nudges
    nudges: Nudges = field(default_factory=Nudges)     # counted here (may be shared across boots)
    beat_cpu: CpuSample = ZERO          # the CPU time at the last heartbeat (QEMU's start before)
    stall_cpu: CpuSample | None = None  # the CPU time when the console reported a lockup
    queries: tuple[str, ...] = WEDGE_QUERIES    # asked of the monitor when L1 wedged
    nudge_commands: tuple[str, ...] = NUDGE     # sent to the monitor to nudge a silent L1

    def on_console(self, data: bytes) -> None:
        """Log console output and note the first lockup or stall report."""
        self.log.write(data)
        self.log.flush()
        self.console_tail = (self.console_tail + data)[-4096:]
        if self.stall is None:
            match = WEDGE_PATTERNS.search(self.console_tail)
            if match:
                start = self.console_tail.rfind(b"\n", 0, match.start()) + 1
                end = self.console_tail.find(b"\n", match.end())
                self.stall = self.console_tail[start:end if end >= 0 else None].strip()
                self.stall_at = time.monotonic()
                self.stall_cpu = self.cpu()

    def on_output(self, data: bytes, sink: BinaryIO | None) -> None:
        """Keep the command's output and stream it on."""
        self.output += data
        if sink is not None:
            sink.write(data)
            sink.flush()

    def on_control(self, data: bytes) -> None:
        """Parse control lines: boot, ready, hb, exit N, fail MESSAGE."""
        self.ctl_buf += data
        *lines, self.ctl_buf = self.ctl_buf.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            word, _, rest = raw.decode(errors="replace").strip().partition(" ")
            if word in ("boot", "ready") and self.clock is not None:
                prioritize(self.clock.pid)      # again: the threads QEMU started since
            if word in ("ready", "hb"):
                self._beat(now, raw)
                if word == "ready":
                    self.ready = now
            elif word == "exit" and rest.isdigit():
                self.status, self.exited_at = int(rest), now
            elif word == "fail":
                self.fail, self.exited_at = rest, now

    def cpu(self) -> CpuSample | None:
        """QEMU's CPU time now, or None when unknown (no clock, QEMU gone)."""
        return self.clock.read() if self.clock is not None else None

    def _beat(self, now: float, line: bytes) -> None:
        """Note a heartbeat (or ready); log it when it came late, with the CPU time L1 got
        in the gap: a long gap with little CPU is a slow host, not a wedge."""
        since = self.heartbeat if self.heartbeat is not None else self.started
        sample = self.cpu()
        if self.nudged is not None and self.nudged == since:
            self.nudges.revived += 1
            self._tell(f"testbed: L1 came back after the nudge, {now - since:.0f} s after its last heartbeat")
        if sample is not None:
            if now - since > SLOW_HEARTBEAT:
                self.log.write(f"testbed: +{now - self.started:.1f} s {line.decode(errors='replace')}: "
                               f"{now - since:.1f} s since the last, in which "
                               f"{sample.since(self.beat_cpu)}\n".encode())
                self.log.flush()
            self.beat_cpu = sample
        self.heartbeat = now

    def _tell(self, line: str) -> None:
        """Put ``line`` in the L1 log and give it to ``note``."""
        self.log.write(f"{line}\n".encode())
        self.log.flush()
        if self.note is not None:
            self.note(line)

    def nudge(self, now: float) -> None:
        """Log where L1 is and nudge it (``nudge_commands``), once per silence."""
        sample = self.cpu()
        self.nudged = self.heartbeat
        self.nudges.sent += 1
        self._tell(f"testbed: L1 silent for {now - (self.heartbeat or self.started):.0f} s"
                   + (f", in which {sample.since(self.beat_cpu)}" if sample else "") + "; nudging it")
        ask_monitor(self, (*self.queries[:2], *self.nudge_commands))

    def publish_steal(self, now: float) -> None:
        """Rewrite :data:`STEAL_FILE` with the vCPU's runqueue wait, once a second."""
        if self.steal_file is None or now - self.steal_at < 1.0:
            return
        self.steal_at = now
        sample = self.cpu()
        if sample is not None:
            tmp = self.steal_file.with_name(self.steal_file.name + ".tmp")
            tmp.write_text(f"{sample.waited:.3f}\n")
            tmp.replace(self.steal_file)    # whole or old: L1 reads it at any time

    def needs_nudge(self, now: float) -> bool:
        """Whether L1 has been silent long enough, in vCPU time, to be nudged (once per
        silence; see :data:`NUDGE`)."""
        since = self.heartbeat if self.heartbeat is not None else self.started
        if self.ready is None or self.exited_at is not None or self.nudged == since:
            return False
        if now - since > NUDGE_LIMIT:
            return True
        if now - since < SLOW_HEARTBEAT:
            return False
        sample = self.cpu()
        return sample is not None and sample.ran_since(self.beat_cpu) > NUDGE_CPU_LIMIT

    def wedged(self, now: float) -> str | None:
        """Why L1 counts as wedged at ``now``, or None while it may still make progress.

        L1 is wedged when its vCPU got :data:`HEARTBEAT_CPU_LIMIT` of CPU time since the last
        heartbeat (:data:`BOOT_CPU_LIMIT` before "ready", :data:`STALL_CPU_LIMIT` since a
        lockup report), or in any case after :data:`HEARTBEAT_LIMIT` (:data:`BOOT_LIMIT`) of
        wall time.  A host that gives L1 little CPU only makes it slow.
        """
        if self.exited_at is not None:
            return None
        since = self.heartbeat if self.heartbeat is not None else self.started
        silent = now - since
        if silent < SLOW_HEARTBEAT:
            return None                 # on time: no need to read /proc
        booted = self.ready is not None
        what = f"no heartbeat for {silent:.0f} s" if booted else f"not booted after {silent:.0f} s"
        wall_limit = HEARTBEAT_LIMIT if booted else BOOT_LIMIT
        cpu_limit = HEARTBEAT_CPU_LIMIT if booted else BOOT_CPU_LIMIT
        if self.stall:
            what += f"; console: {self.stall.decode(errors='replace')}"
        sample = self.cpu()
        if sample is None:
            return what if silent > wall_limit else None
        mark = self.beat_cpu
        if self.stall_cpu is not None and self.stall_at is not None:
            # After a lockup report the limit is lower, counted from the later of the report
            # and the last heartbeat.  Not at once: a starved L1 reports lockups too.
            cpu_limit = STALL_CPU_LIMIT
            if self.stall_at > since:
                mark = self.stall_cpu
        if sample.ran_since(mark) > cpu_limit or silent > wall_limit:
            return f"{what}; in that time {sample.since(self.beat_cpu)}"
        return None


def prioritize(pid: int) -> None:
    """Give every thread of process ``pid`` the nice value :data:`NICE` (threads started
    later inherit it from the thread that starts them); nothing where that is not allowed."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), NICE)
        except PermissionError:
            return
        except OSError:                 # the thread ended meanwhile
            continue


def ask_monitor(boot: Watch, queries: Sequence[str], limit: float = 10.0) -> None:
    """Ask QEMU's monitor ``queries`` (half a second apart) and log the answers: evidence of
    where a wedged L1 is.  Best effort: a QEMU that does not answer within ``limit`` s is
    noted and left alone."""
    if boot.monitor is None:
        return
    deadline = time.monotonic() + limit
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mon:
            mon.settimeout(limit)
            mon.connect(str(boot.monitor))
            _read_prompt(mon, deadline)
            for query in queries:
                mon.sendall(query.encode() + b"\n")
                answer = _read_prompt(mon, deadline).replace(b"\r", b"").split(b"\n")[1:]   # echo
                kept = b"\n".join(line for line in answer if not line.startswith(MONITOR_NOISE))
                boot.log.write(f"testbed: monitor: {query}\n".encode() + kept.strip() + b"\n")
                time.sleep(0.5)
    except (OSError, TimeoutError) as err:
        boot.log.write(f"testbed: monitor: no answer ({err})\n".encode())
    boot.log.flush()


def _read_prompt(mon: socket.socket, deadline: float) -> bytes:
    """What the monitor writes up to its next ``(qemu) `` prompt (the prompt left out)."""
    data = b""
    while not data.endswith(b"(qemu) "):
        mon.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = mon.recv(65536)
        if not chunk:
            raise OSError("the monitor closed")
        data += chunk
    return data[:-len(b"(qemu) ")]

