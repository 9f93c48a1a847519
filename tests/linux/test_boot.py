"""Debian's stock kernel boots under AltoVirt (seccomp on): ACPI finds the machine, the serial
console works both ways, QMP system_reset boots Linux again, a guest poweroff ends the VMM
with status 0, the jailer runs it as an unprivileged user, and a warm parent forks it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import Qmp, altovirt_argv

BOOT_TIMEOUT = 400               # seconds: a boot takes about 90 s in the nested test bed
JAILER = str(Path(sys.executable).parent / "altovirt-jailer")
pytestmark = pytest.mark.timeout(1200)     # a test may boot twice


def test_one_vcpu_console_reset_and_poweroff(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    argv = altovirt_argv(kernel, initrd, "-smp", "1", "-m", "256M", "-api-channel", f"unix:{sock}")
    with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log") as g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("echo hello from $(uname -r)").strip() == f"hello from {kernel.release}"
        assert g.check("nproc").strip() == "1"
        # grep in the guest: dmesg's whole text over the serial console took over 60 s on a slow host.
        dmesg = g.check("dmesg | grep -E 'ACPI: (Using|PM:)|virtio_mmio'")
        assert "ACPI: Using ACPI (MADT) for SMP configuration information" in dmesg
        assert "ACPI: PM: (supports S0 S5)" in dmesg
        assert "virtio_mmio: unknown parameter 'device' ignored" in dmesg   # Debian's kernel: ACPI only
        qmp = Qmp(sock)
        try:
            qmp.ok("system_reset")
            assert qmp.event("RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
            g.wait_ready(BOOT_TIMEOUT)          # Linux boots again, from the start
            assert float(g.check("cut -d' ' -f1 /proc/uptime")) < BOOT_TIMEOUT
            g.send(b"poweroff\n")
            assert qmp.event("SHUTDOWN", BOOT_TIMEOUT)["data"] == {"guest": True,
                                                                   "reason": "guest-shutdown"}
        finally:
            qmp.close()
        assert g.wait_exit(60) == 0
        assert "reboot: Power down" in g.serial


def test_two_vcpus_through_the_jailer(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    """As uid 4242 in the jail, the guest's own reboot (ACPI reset register) ends the VMM with 0."""
    argv = [JAILER, "--id", "linux-1", "--uid", "4242", "--gid", "4242", "--chroot-base-dir",
            str(tmp_path / "jails"), "--source", str(kernel.vmlinuz), str(initrd), "--",
            "-kernel", kernel.vmlinuz.name, "-initrd", initrd.name, "-append", guest.APPEND,
            "-smp", "2", "-m", "512M", "-serial", "stdio"]
    with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log") as g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("nproc").strip() == "2"
        assert g.check("cat /sys/devices/system/cpu/online").strip() == "0-1"
        g.send(b"reboot\n")
        assert g.wait_exit(BOOT_TIMEOUT) == 0
        assert "reboot: Restarting system" in g.serial


def test_through_a_warm_parent(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    """Forked by ``altovirt serve``, the VMM serves its caller's console both ways, and the
    guest's poweroff is the caller's exit status."""
    sock = tmp_path / "warm.sock"
    parent = subprocess.Popen([sys.executable, "-m", "altovirt", "serve", "--socket", str(sock)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300           # it imports every module, under TCG
        while not sock.exists():
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
            time.sleep(0.1)
        argv = altovirt_argv(kernel, initrd, "-smp", "1", "-m", "256M")
        env = dict(os.environ, ALTOVIRT_SERVER=str(sock))
        with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log", env=env) as g:
            g.wait_ready(BOOT_TIMEOUT)
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            assert len(children) == 1 and int(children[0]) != g.proc.pid
            assert g.check("echo hello from $(uname -r)").strip() == f"hello from {kernel.release}"
            g.send(b"poweroff\n")
            assert g.wait_exit(BOOT_TIMEOUT) == 0
            assert "reboot: Power down" in g.serial
    finally:
        parent.terminate()
        _, err = parent.communicate(timeout=60)
    assert parent.returncode == 0 and err == b""
