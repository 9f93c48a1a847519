"""Debian's stock arm64 kernel boots under AltoVirt (seccomp on) on an arm64 host: the device
tree describes the board (GICv3, PSCI, the architected timer, the PL011 and PL031), the serial
console works both ways, QMP system_reset boots Linux again, and a guest's poweroff and reboot
(PSCI SYSTEM_OFF and SYSTEM_RESET) end the VMM with status 0, the latter in the jailer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ..linux.conftest import ARCH, Qmp, altovirt_argv
from ..testbed import debian, guest

BOOT_TIMEOUT = 400               # seconds: a boot takes 20-60 s in the arm64 test bed
pytestmark = pytest.mark.timeout(1200)     # a test may boot twice


def test_one_vcpu_console_reset_and_poweroff(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    argv = altovirt_argv(kernel, initrd, "-smp", "1", "-m", "256M", "-api-channel", f"unix:{sock}")
    with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log") as g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("echo hello from $(uname -rm)").strip() == f"hello from {kernel.release} aarch64"
        assert g.check("nproc").strip() == "1"
        # grep in the guest: dmesg's whole text over the serial console took over 60 s on a slow host.
        dmesg = g.check("dmesg | grep -E 'Machine model|psci:|GICv3:|arch_timer:|pl011|pl031|Run /init'")
        for line in ("Machine model: AltoVirt", "psci: PSCIv1.", "GICv3: 96 SPIs implemented",
                     "arch_timer: cp15 timer(s) running at", "9000000.pl011: ttyAMA0 at MMIO 0x9000000",
                     "rtc-pl031 9010000.pl031: registered as rtc0", "Run /init as init process"):
            assert line in dmesg, line
        # The guest's clock came from the PL031: the host's time, to a few seconds.
        assert abs(int(g.check("date +%s")) - int(__import__("time").time())) < 30
        qmp = Qmp(sock)
        try:
            cpus: list[dict[str, object]] = qmp.ok("query-cpus-fast")["return"]  # type: ignore[assignment]
            assert [(c["cpu-index"], c["target"]) for c in cpus] == [(0, "aarch64")]
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


def test_two_vcpus_and_a_guest_reboot_through_the_jailer(kernel: debian.Kernel, initrd: Path,
                                                         tmp_path: Path) -> None:
    """As uid 4242 in the jail: the secondary vCPU comes up through PSCI CPU_ON; the guest's
    reboot (PSCI SYSTEM_RESET) ends the VMM with 0."""
    argv = [sys.executable, "-m", "altovirt.jailer", "--id", "linux-1", "--uid", "4242", "--gid", "4242",
            "--chroot-base-dir", str(tmp_path / "jails"), "--source", str(kernel.vmlinuz), str(initrd), "--",
            "-kernel", kernel.vmlinuz.name, "-initrd", initrd.name, "-append", ARCH.guest_append,
            "-smp", "2", "-m", "512M", "-serial", "stdio"]
    with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log") as g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("nproc").strip() == "2"
        assert g.check("cat /sys/devices/system/cpu/online").strip() == "0-1"
        assert "CPU1: Booted secondary processor" in g.check("dmesg | grep CPU1")
        g.send(b"reboot\n")
        assert g.wait_exit(BOOT_TIMEOUT) == 0
        assert "reboot: Restarting system" in g.serial
