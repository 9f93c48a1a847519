"""AltoVirt on an arm64 host whose GIC is a v2 (the aarch64-gicv2 test bed: QEMU's virt with
gic-version=2), where KVM has no GICv3 to give a guest: the board falls back to a GICv2 for up
to 8 vCPUs, as Firecracker's and QEMU's do. The probe and Debian's arm64 kernel boot on it with
2 vCPUs, both taking their timer interrupts, and are saved, restored and migrated with its
state; 9 vCPUs are refused in one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import GUEST, ProbeReport, vms
from ..linux.conftest import Qmp, altovirt_argv, migration_ends, wait_for_qmp
from ..linux.test_snapshot import wait_status
from ..linux_arm64.test_probe import test_probe_snapshot_restore_and_live_migration
from ..testbed import debian, guest

__all__ = ["test_probe_snapshot_restore_and_live_migration", "vms"]
BOOT_TIMEOUT = 400
PROBE = str(GUEST / "probe-arm64.Image")
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif("GICv2" not in Path("/proc/interrupts").read_text(),
                                 reason="SKIPPED LOUDLY: this host's GIC is not a v2 (the aarch64-gicv2 "
                                        "test bed's is)")]


def test_probe_with_two_vcpus_and_nine_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096)
    p = subprocess.run([sys.executable, "-m", "altovirt", "-kernel", PROBE, "-smp", "2", "-m", "256M",
                        "-drive", f"id=d0,file={disk}", "-device", "virtio-rng",
                        "-append", "probe.run=info,smp,blk,rng", "-serial", "stdio"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    r = ProbeReport.parse(p.stdout)
    assert p.returncode == 0 and r.done == "ok", p.stdout[-2000:] + p.stderr
    assert r.tests == {"info": "ok", "smp": "ok", "blk": "ok", "rng": "ok"}
    assert r.line("smp ") == "smp cpus=2 expected=2 bsp=0x0"
    p = subprocess.run([sys.executable, "-m", "altovirt", "-kernel", PROBE, "-smp", "9", "-serial", "stdio"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "altovirt: error: cannot set up the VM's interrupt controllers: this host's GIC is a GICv2, which "
        "serves at most 8 vCPUs; the VM has 9"], p.stderr


def timer_counts(g: guest.LinuxGuest) -> list[int]:
    return [int(n) for n in g.check("grep arch_timer /proc/interrupts").split()[1:3]]


def both_vcpus_tick(g: guest.LinuxGuest) -> None:
    before = timer_counts(g)
    g.check("sleep 2")
    after = timer_counts(g)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_debian_on_a_gicv2_saved_and_restored(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    data = bytes(range(256)) * (1 << 14)            # 4 MiB
    disk.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    def start(name: str, *extra: str) -> tuple[guest.LinuxGuest, Path]:
        sock = tmp_path / f"{name}.sock"
        argv = altovirt_argv(kernel, initrd, "-smp", "2", "-m", "512M", "-drive", f"id=d0,file={disk}",
                             "-api-channel", f"unix:{sock}", *extra)
        return guest.LinuxGuest(argv, log_path=tmp_path / f"{name}.serial.log"), sock

    g, sock = start("boot")
    with g:
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("nproc").strip() == "2"
        interrupts = g.check("cat /proc/interrupts")
        # Linux's GICv2 driver, named GIC-0 in a guest (GICv2 at EL2, where it splits EOI).
        assert "GIC-0" in interrupts and "GICv3" not in interrupts, interrupts
        both_vcpus_tick(g)
        assert g.check("head -c 4194304 /dev/vda | sha256sum").split()[0] == digest   # an SPI, via the GICv2
        g.check("export MARK=kept-in-the-shell")
        qmp = Qmp(sock)
        try:
            qmp.ok("stop")
            qmp.ok("migrate", uri=f"file:{tmp_path / 'snap'}")
            info = migration_ends(qmp)
            assert info["status"] == "completed", info
            qmp.ok("quit")
        finally:
            qmp.close()
        assert g.wait_exit(60) == 0
    g, sock = start("restored", "-incoming", f"file:{tmp_path / 'snap'},resume=on")
    with g:
        qmp = wait_for_qmp(g, sock)
        try:
            wait_status(qmp, "running")
            # The same shell, both vCPUs ticking through the restored GICv2, the disk's interrupt.
            assert g.check("echo $MARK").strip() == "kept-in-the-shell"
            both_vcpus_tick(g)
            assert g.check("echo 3 > /proc/sys/vm/drop_caches; head -c 4194304 /dev/vda | sha256sum"
                           ).split()[0] == digest
            assert abs(int(g.check("date +%s")) - time.time()) < 30
            g.send(b"poweroff\n")
            assert qmp.event("SHUTDOWN", BOOT_TIMEOUT)["data"] == {"guest": True, "reason": "guest-shutdown"}
        finally:
            qmp.close()
        assert g.wait_exit(60) == 0
