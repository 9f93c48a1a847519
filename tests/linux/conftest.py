"""Fixtures for Linux guests: Debian's kernel, the test initramfs, AltoVirt and QEMU command
lines, a network namespace with a tap, and a QMP client."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..testbed import arch, debian, guest, initramfs

# The guests are of the machine the tests run on (in the x86_64 or the aarch64 test bed).
ARCH = arch.get(os.uname().machine)

# Link-local addresses: nothing outside the namespace the test makes can be reached.
HOST_IP, GUEST_IP, PREFIX = "169.254.77.1", "169.254.77.2", 24


@pytest.fixture(scope="session", autouse=True)
def logs_back_to_the_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In the test bed, the guests' serial logs are copied to TESTBED_OUT/logs at the end,
    where the host can read them after L1 is gone."""
    yield
    out = os.environ.get("TESTBED_OUT")
    if out:
        base = tmp_path_factory.getbasetemp()
        for log in base.rglob("*.log"):
            dest = Path(out) / "logs" / log.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)


@pytest.fixture(scope="session")
def kernel() -> debian.Kernel:
    return debian.kernel(ARCH)


@pytest.fixture(scope="session")
def initrd(kernel: debian.Kernel) -> Path:
    """The default initramfs: the one the host built for a foreign test bed (whose L1 has
    neither apt nor the cross compiler), else built here."""
    given = os.environ.get("TESTBED_INITRD")
    if given and not ARCH.native:
        return Path(given)
    return initramfs.build(kernel)


def altovirt_argv(kernel: debian.Kernel, initrd: Path, *args: str, append: str = "") -> list[str]:
    """AltoVirt booting the test guest with its serial console on stdio (seccomp on)."""
    return [sys.executable, "-m", "altovirt", "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", f"{ARCH.guest_append} {append}".strip(), "-serial", "stdio", *args]


def qemu_argv(kernel: debian.Kernel, initrd: Path, *args: str, append: str = "", cpus: int = 1,
              mem: str = "512M") -> list[str]:
    """QEMU on the same KVM, for the reference runs: microvm (ACPI on, as AltoVirt) on x86,
    virt with a GICv3 (a device tree, as AltoVirt) on arm64; virtio-mmio version 2 on both."""
    if ARCH.name == "x86_64":
        qemu, machine = shutil.which("qemu-system-x86_64"), ["-M", "microvm"]
    else:
        qemu, machine = shutil.which("qemu-system-aarch64"), ["-M", "virt,gic-version=3", "-no-reboot",
                                                               "-global", "virtio-mmio.force-legacy=false"]
    assert qemu is not None
    return [qemu, *machine, "-accel", "kvm", "-cpu", "host", "-smp", str(cpus), "-m", mem,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", f"{ARCH.guest_append} {append}".strip(), *args]


class Qmp:
    """A QMP connection (qemu.qmp's synchronous client) that keeps events for later checks."""

    def __init__(self, path: Path) -> None:
        self.client = QEMUMonitorProtocol(str(path))
        self.client.connect()

    def ok(self, command: str, **args: object) -> dict[str, object]:
        reply = self.client.cmd_obj({"execute": command, "arguments": args})
        assert "return" in reply, reply
        return reply

    def event(self, name: str, timeout: float = 60) -> dict[str, object]:
        """The next event called ``name`` (others are dropped)."""
        while True:
            ev = self.client.pull_event(wait=timeout)
            assert ev is not None, f"no {name} event within {timeout} s"
            if ev["event"] == name:
                return ev

    def close(self) -> None:
        """Close our end. A VMM that already ended (a guest's power-off) has closed its end
        first: qemu.qmp then raises what its reader met (EOF), which is no failure here."""
        with contextlib.suppress(EOFError, ConnectionError):
            self.client.close()


def wait_for_qmp(g: guest.LinuxGuest, path: Path, timeout: float = 120) -> Qmp:
    """A QMP connection to the VMM running ``g``, once its socket ``path`` appears."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or g.proc.poll() is not None:
            raise g.fail("the VMM did not open its QMP socket")
        time.sleep(0.1)
    return Qmp(path)


def migration_ends(qmp: Qmp, timeout: float = 600) -> dict[str, Any]:
    """query-migrate's answer once the migration has ended, whichever way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = qmp.ok("query-migrate")["return"]        # type: ignore[assignment]
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.2)
    raise AssertionError("the migration did not end")


class Netns:
    """A private network namespace holding taps; the VMM runs inside it (``prefix``)."""

    _made = itertools.count()

    def __init__(self, *taps: str) -> None:
        self.name = f"altovirt-linux-{os.getpid()}-{next(Netns._made)}"
        self._ip("netns", "add", self.name)
        for tap in taps:
            self._ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap")
        self._ip("-n", self.name, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def address(self, tap: str, addr: str) -> None:
        self._ip("-n", self.name, "addr", "add", addr, "dev", tap)
        self._ip("-n", self.name, "link", "set", tap, "up")

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *args: str, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.prefix, *args], capture_output=True, timeout=timeout, input=input)

    def receiver(self, port: int, size: int) -> subprocess.Popen[str]:
        """A TCP server in the namespace, listening when this returns, that takes one connection,
        reads ``size`` bytes, closes it and prints "<bytes read> <md5>": busybox nc never
        half-closes at the end of its input, so the receiver must end the connection."""
        code = ("import hashlib, socket\n"
                f"s = socket.create_server(('', {port})); print('listening', flush=True)\n"
                f"c, _ = s.accept(); n = {size}; h = hashlib.md5()\n"
                "while n > 0:\n"
                "    b = c.recv(min(n, 65536))\n"
                "    if not b: break\n"
                "    h.update(b); n -= len(b)\n"
                f"c.close(); print({size} - n, h.hexdigest())\n")
        proc = subprocess.Popen([*self.prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        return proc

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


# --- altovirt-firecracker, driven with curl as Firecracker's users drive it ---
FIRECRACKER = [sys.executable, "-m", "altovirt.firecracker"]


def curl_status(sock: Path, method: str, path: str, body: object = None) -> tuple[int, object]:
    """One request with curl: its status and JSON answer (None if empty)."""
    cmd = ["curl", "-sS", "-X", method, "--unix-socket", str(sock), "-w", "\n%{http_code}"]
    if body is not None:
        cmd += ["--data", json.dumps(body)]
    done = subprocess.run([*cmd, f"http://localhost{path}"], capture_output=True, text=True, timeout=120)
    text, _, code = done.stdout.rpartition("\n")
    assert code.isdigit(), f"{method} {path}: no answer: {done.stderr}"
    return int(code), json.loads(text) if text else None


def curl(sock: Path, method: str, path: str, body: object = None) -> object:
    """One request with curl; its JSON answer (None for 204). AssertionError unless 2xx."""
    code, answer = curl_status(sock, method, path, body)
    assert code in (200, 204), f"{method} {path}: {code} {answer}"
    return answer


def firecracker_guest(d: Path, *args: str, prefix: Sequence[str] = ()) -> tuple[guest.LinuxGuest, Path]:
    """``altovirt-firecracker`` (after ``prefix``: a network namespace's, say) with its API at
    ``d``/api.sock and its log and serial console in ``d``, once the socket is there."""
    sock = d / "api.sock"
    g = guest.LinuxGuest([*prefix, *FIRECRACKER, "--api-sock", str(sock), "--log-path", str(d / "vmm.log"),
                          *args], log_path=d / "serial.log")
    try:
        wait_socket(g, sock)
    except BaseException:
        g.close()
        raise
    return g, sock


def start_firecracker_guest(g: guest.LinuxGuest, sock: Path, kernel: debian.Kernel, initrd: Path,
                            *puts: tuple[str, object], append: str = "", vcpus: int = 2, mem_mib: int = 512,
                            timeout: float = 400) -> None:
    """Configure the guest (its boot source, ``append`` added to the test guest's command
    line, and machine, then each ``PUT`` path and body) with curl, start it and wait for its
    shell; the guest closed if that fails."""
    try:
        curl(sock, "PUT", "/boot-source", {"kernel_image_path": str(kernel.vmlinuz),
                                           "initrd_path": str(initrd),
                                           "boot_args": f"{guest.APPEND} {append}".strip()})
        curl(sock, "PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib})
        for path, body in puts:
            curl(sock, "PUT", path, body)
        curl(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        g.wait_ready(timeout)
    except BaseException:
        g.close()
        raise


def wait_socket(g: guest.LinuxGuest, sock: Path) -> None:
    deadline = time.monotonic() + 120
    while not sock.exists():
        if time.monotonic() > deadline or g.proc.poll() is not None:
            raise g.fail("the VMM did not open its API socket")
        time.sleep(0.05)
