"""Snapshots and live migration of a running Debian arm64 guest (2 vCPUs, 512 MiB) over QMP, as
on x86 (tests/linux/test_snapshot.py, whose bed this module shares): one boot, then in file order

1. the booted guest, busy in a shell with its disk mounted, is saved to a snapshot;
2. a VM restored from it carries on: the same shell on the PL011, its uptime, its clock, both
   vCPUs taking timer interrupts through the restored GIC, its disk, NIC and vsock;
3. that VM migrates live to another process while it keeps rewriting 64 MiB.

An arm64 VM has no VM generation ID (an ACPI device): the x86 module's checks of it stay there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

import pytest

from ..linux.conftest import migration_ends
from ..linux.test_snapshot import (
    BEFORE,
    UMOUNT,
    Bed,
    Run,
    answer,
    bed,
    network_and_vsock_work,
    uptime,
    wait_status,
)
from ..testbed import guest

__all__ = ["bed"]
pytestmark = pytest.mark.timeout(1200)


def timer_interrupts(r: Run) -> list[int]:
    """Each CPU's count of architected timer interrupts (/proc/interrupts' arch_timer line)."""
    line = r.g.check("grep arch_timer /proc/interrupts")
    return [int(n) for n in line.split()[1:3]]


def test_snapshot_of_a_busy_guest(bed: Bed) -> None:
    src = bed.start("boot", ready=True)
    assert src.g.check("nproc").strip() == "2"
    src.g.check(f"mkdir -p /mnt && mount /dev/vda /mnt && printf '{BEFORE}' > /mnt/before.txt && sync")
    src.g.check("cd /mnt && export MARK=kept-in-the-shell")     # shell state the snapshot must keep
    bed.facts["uptime"] = uptime(src)
    src.qmp.ok("stop")
    src.qmp.ok("migrate", uri=f"file:{bed.dir / 'snap'}")
    info = migration_ends(src.qmp)
    assert info["status"] == "completed", info
    src.qmp.ok("quit")
    assert src.g.wait_exit(120) == 0
    shutil.copyfile(bed.dir / "rw.img", bed.dir / "snap-disk.img")


def test_restored_guest_carries_on(bed: Bed) -> None:
    r = bed.start("restored", "-incoming", f"file:{bed.dir / 'snap'}")
    wait_status(r.qmp, "paused")
    r.qmp.ok("cont")
    # The same shell, through the restored PL011: its directory and variables, the mounted
    # disk, an uptime that went on (the virtual counter held), the PL031's wall clock.
    assert r.g.check("echo $PWD $MARK").strip() == "/mnt kept-in-the-shell"
    assert r.g.check("cat /mnt/before.txt") == BEFORE
    assert bed.facts["uptime"] < uptime(r) < bed.facts["uptime"] + 120
    assert abs(int(r.g.check("date +%s")) - time.time()) < 30
    # Both vCPUs take their timer interrupts through the restored GIC and redistributors.
    before = timer_interrupts(r)
    r.g.check("sleep 2")
    after = timer_interrupts(r)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    r.g.check("echo written after the restore > /mnt/after.txt && sync")
    r.g.check("cd /")
    network_and_vsock_work(bed, r, 5300)


def test_live_migration_of_a_guest_writing_memory(bed: Bed,
                                                  record_property: Callable[[str, object], None]) -> None:
    src = next(r for r in bed.runs if r.name == "restored")
    src.g.check("dirty 64 20 > /tmp/dirty.out 2>&1 & echo started")
    time.sleep(3)
    dst = bed.start("migrated", "-incoming", f"unix:{bed.dir / 'mig.sock'}", tap="tapm")
    src.qmp.ok("migrate-set-parameters", **{"downtime-limit": 500, "max-bandwidth": 0})
    stolen = guest.stolen()
    src.qmp.ok("migrate", uri=f"unix:{bed.dir / 'mig.sock'}")
    info = migration_ends(src.qmp)
    assert info["status"] == "completed", info
    stolen_ms = 1000 * (guest.stolen() - stolen)
    for name, value in (("downtime_ms", info["downtime"]), ("total_ms", info["total-time"]),
                        ("passes", info["ram"]["dirty-sync-count"]), ("stolen_ms", round(stolen_ms))):
        record_property(name, value)
    assert info["downtime"] <= 500 + stolen_ms, (info, f"{stolen_ms:.0f} ms stolen")
    assert answer(src.qmp, "query-status")["status"] == "postmigrate"
    wait_status(dst.qmp, "paused")
    dst.qmp.ok("cont")
    assert dst.g.check("kill -TERM $(pidof dirty); sleep 2; cat /tmp/dirty.out").startswith(
        "dirty ok pages=16384")                          # every page the guest wrote arrived
    dst.g.check("echo written after the migration > /mnt/migrated.txt && sync && cd / && " + UMOUNT)
    network_and_vsock_work(bed, dst, 5400)
    src.qmp.ok("quit")
    dst.qmp.ok("quit")
    assert dst.g.wait_exit(120) == 0
    assert guest.read_ext4(bed.dir / "rw.img", "/after.txt") == b"written after the restore\n"
    assert guest.read_ext4(bed.dir / "rw.img", "/migrated.txt") == b"written after the migration\n"
