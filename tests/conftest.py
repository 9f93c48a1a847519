"""Shared fixtures: the built probe guest, running AltoVirt and QEMU, reading probe output."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from altovirt.eventloop import EventLoop

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guest"
# The probe image for this host's architecture, in GUEST.
PROBE_KERNEL = "probe-arm64.Image" if os.uname().machine == "aarch64" else "probe.elf"
QEMU = shutil.which("qemu-system-x86_64")


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "SKIPPED LOUDLY: /dev/kvm does not exist on this host; KVM boot tests cannot run"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "SKIPPED LOUDLY: no read/write permission on /dev/kvm; run the tests as root"
    return None


KVM_PROBLEM = _kvm_problem()


def _hardware_virt_problem() -> str | None:
    """Why stock Linux kernels cannot boot on this /dev/kvm, or None."""
    if KVM_PROBLEM:
        return KVM_PROBLEM
    if os.uname().machine == "aarch64":
        return None                 # arm64 KVM is hardware virtualization (no PVM there)
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    if "svm" not in flags and "vmx" not in flags:
        return ("this /dev/kvm has no hardware virtualization (no svm/vmx: PVM?), so stock Linux "
                "kernels cannot boot on it; tests/test_linux.py runs tests/linux in the nested test bed")
    return None


HARDWARE_VIRT_PROBLEM = _hardware_virt_problem()
# tests/linux boots Debian's own x86 kernel, tests/linux_arm64 (and linux_arm64_gicv2, on a
# GICv2 host) its arm64 kernel, each on its own machine; where that cannot boot them, the test
# beds run them (test_linux.py).
collect_ignore = ["linux_arm64", "linux_arm64_gicv2"] if os.uname().machine == "x86_64" else ["linux"]
if HARDWARE_VIRT_PROBLEM:
    collect_ignore = ["linux", "linux_arm64", "linux_arm64_gicv2"]
needs_kvm = pytest.mark.skipif(KVM_PROBLEM is not None, reason=KVM_PROBLEM or "")
needs_qemu = pytest.mark.skipif(
    QEMU is None or KVM_PROBLEM is not None,
    reason="SKIPPED LOUDLY: qemu-system-x86_64 (Debian qemu-system-x86) or /dev/kvm is missing; "
           "the differential tests against QEMU cannot run")


@pytest.fixture(scope="session")
def probe() -> Path:
    """The guest/ directory with every probe image built."""
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True, capture_output=True)
    return GUEST


@dataclass
class ProbeReport:
    """The ``probe: ...`` lines a guest printed, parsed."""

    lines: list[str]
    values: dict[str, str] = field(default_factory=dict)
    e820: list[tuple[int, int, int]] = field(default_factory=list)
    tests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ProbeReport:
        lines = [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.startswith("probe: ")]
        r = cls(lines)
        for ln in lines:
            body = ln[len("probe: "):]
            if body.startswith("e820 "):
                a, s, t = body.split()[1:]
                r.e820.append((int(a, 16), int(s, 16), int(t)))
            elif body.startswith("test "):
                _, name, result = body.split()[:3]
                r.tests[name] = result
            elif body.startswith("cmdline="):
                r.values["cmdline"] = body[len("cmdline="):]
            else:
                for word in body.split():
                    if "=" in word:
                        k, v = word.split("=", 1)
                        r.values.setdefault(k, v)
                first = body.split()[0] if body.split() else ""
                r.values.setdefault(f"{first}:line", body)
        return r

    def line(self, prefix: str) -> str:
        for ln in self.lines:
            if ln.startswith("probe: " + prefix):
                return ln[len("probe: "):]
        raise AssertionError(f"no 'probe: {prefix}' line in:\n" + "\n".join(self.lines))

    @property
    def done(self) -> str | None:
        return next((ln.split()[2] for ln in self.lines if ln.startswith("probe: done ")), None)


def altovirt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "altovirt", *args]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    report: ProbeReport


def run_altovirt(*args: str, timeout: float = 60, stdin: str | None = None) -> Run:
    p = subprocess.run(altovirt_cmd(*args), capture_output=True, text=True, timeout=timeout,
                       input=stdin if stdin is not None else "", cwd=ROOT)
    return Run(p.returncode, p.stdout, p.stderr, ProbeReport.parse(p.stdout))


def qemu_cmd(kernel: Path, cmdline: str, *, smp: int = 1, mem: str = "256M",
             initrd: Path | None = None, devices: tuple[str, ...] = (),
             extra: tuple[str, ...] = ()) -> list[str]:
    """QEMU microvm booting ``kernel`` (PVH); ``devices`` are virtio-mmio v2 devices
    that QEMU announces on the kernel command line, as AltoVirt does; ``extra`` are
    more options (their backends)."""
    assert QEMU is not None
    machine = "microvm,acpi=off" + (",auto-kernel-cmdline=on" if devices else "")
    # -cpu host,-arch-capabilities: on PVM hosts KVM refuses MSR_IA32_ARCH_CAPABILITIES.
    cmd = [QEMU, "-M", machine, "-accel", "kvm", "-cpu", "host,-arch-capabilities",
           "-m", mem, "-smp", f"{smp},sockets=1,cores={smp}", "-nodefaults", "-no-user-config",
           "-nographic", "-serial", "stdio", "-no-reboot",
           "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(kernel), "-append", cmdline]
    if initrd:
        cmd += ["-initrd", str(initrd)]
    if devices:
        cmd += ["-global", "virtio-mmio.force-legacy=false"]
        for d in devices:
            cmd += ["-device", d]
    return cmd + list(extra)


def run_qemu(kernel: Path, cmdline: str, timeout: float = 60, **kw: object) -> Run:
    p = subprocess.run(qemu_cmd(kernel, cmdline, **kw), capture_output=True, text=True,  # type: ignore[arg-type]
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr, ProbeReport.parse(p.stdout))


class Vm:
    """A running altovirt process whose stdout lines can be waited for."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = (), launcher: list[str] | None = None) -> None:
        """``prefix`` runs the VMM through another command (``ip netns exec NS``); ``launcher``
        replaces ``python -m altovirt`` (with the jailer, say)."""
        command = [*(launcher or altovirt_cmd()), *args]
        self.proc = subprocess.Popen([*prefix, *command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        self._reader_thread = threading.Thread(target=self._reader, daemon=True)
        self._reader_thread.start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))

    def wait_for_path(self, path: Path, timeout: float = 20) -> None:
        """Wait for the VMM to create ``path`` (a socket, say); AssertionError if it exits first."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"the VMM exited: {self.finish()[1]}"
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.01)

    def type(self, line: str) -> None:
        """Send a line to the guest's serial console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_line(self, text: str, timeout: float = 30) -> float:
        """Wait for a stdout line starting with ``text``; returns when it arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                when, line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(text):
                return when
        raise AssertionError(f"never saw {text!r}; got {self.seen}")

    def line(self, text: str, timeout: float = 30) -> str:
        """The next stdout line starting with ``text``."""
        self.wait_line(text, timeout)
        return self.seen[-1]

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for exit; return the status and stderr, with stdout collected in ``seen``."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        self.proc.wait(timeout)
        err = self.proc.stderr.read()
        self._reader_thread.join(timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get()[1])
        return self.proc.returncode, err.decode()


@pytest.fixture
def io() -> Iterator[EventLoop]:
    """A running I/O event loop, as a device's (its timers, the rate limiter's and the balloon's)."""
    loop = EventLoop("io")
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait()
