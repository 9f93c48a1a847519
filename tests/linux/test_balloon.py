"""virtio-balloon under Debian's driver, set through altovirt-firecracker's API: inflating by N
MiB takes N MiB from the guest's MemTotal and about as much from the VMM's resident memory,
statistics arrive, QMP hears BALLOON_CHANGE, and a free page hinting run gives free memory
back; with deflate_on_oom the guest takes pages back when it needs them, and free page
reporting gives freed memory back to the host. Two boots."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..testbed import debian, guest, initramfs
from .conftest import curl, firecracker_guest, start_firecracker_guest

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(900)
MEM_MIB = 512


@pytest.fixture(scope="module")
def initrd(kernel: debian.Kernel) -> Path:
    return initramfs.build(kernel, modules=(*initramfs.DEFAULT_MODULES, "virtio_balloon"))


def boot(kernel: debian.Kernel, initrd: Path, d: Path,
         balloon: dict[str, object]) -> tuple[guest.LinuxGuest, Path]:
    g, sock = firecracker_guest(d, "--qmp", str(d / "qmp.sock"))
    start_firecracker_guest(g, sock, kernel, initrd, ("/balloon", balloon), mem_mib=MEM_MIB,
                            timeout=BOOT_TIMEOUT)
    return g, sock


def rss_mib(g: guest.LinuxGuest) -> float:
    with open(f"/proc/{g.proc.pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def mem_total_mib(g: guest.LinuxGuest) -> float:
    return int(g.check("grep MemTotal /proc/meminfo").split()[1]) / 1024


def actual_mib(sock: Path, target: int, seconds: float = 120) -> int:
    """The balloon's size once it is ``target`` MiB (or has stopped moving for 10 s)."""
    deadline, last, steady = time.monotonic() + seconds, -1, time.monotonic()
    while True:
        stats = curl(sock, "GET", "/balloon/statistics")
        assert isinstance(stats, dict)
        now = int(stats["actual_mib"])
        if now == target or time.monotonic() > deadline or time.monotonic() - steady > 10:
            return now
        if now != last:
            last, steady = now, time.monotonic()
        time.sleep(0.5)


def test_inflate_deflate_and_statistics(kernel: debian.Kernel, initrd: Path, tmp_path: Path,
                                        record_property: Callable[[str, object], None]) -> None:
    g, sock = boot(kernel, initrd, tmp_path, {"amount_mib": 0, "deflate_on_oom": False,
                                              "stats_polling_interval_s": 1, "free_page_hinting": True})
    qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
    try:
        qmp.connect()
        total = mem_total_mib(g)
        g.check("dd if=/dev/zero of=/dev/null bs=360M count=1", timeout=300)    # the guest's RAM, touched
        rss = rss_mib(g)
        curl(sock, "PATCH", "/balloon", {"amount_mib": 200})
        assert actual_mib(sock, 200) == 200
        time.sleep(1)
        total_in, rss_in = mem_total_mib(g), rss_mib(g)
        record_property("memtotal_drop_mib", round(total - total_in))
        record_property("rss_drop_mib", round(rss - rss_in))
        assert abs((total - total_in) - 200) < 4, (total, total_in)
        assert rss - rss_in > 160, (rss, rss_in)
        stats = curl(sock, "GET", "/balloon/statistics")
        assert isinstance(stats, dict) and stats["target_mib"] == 200
        assert {"total_memory", "free_memory", "available_memory"} <= set(stats), stats
        assert abs(stats["total_memory"] / 2**20 - total_in) < 4
        # QMP: the events come before the answer that follows them.
        assert qmp.cmd_obj({"execute": "query-balloon"}) == {"return": {"actual": (MEM_MIB - 200) << 20}}
        events = [e for e in qmp.get_events(wait=False) if e["event"] == "BALLOON_CHANGE"]
        assert events and events[-1]["data"]["actual"] == (MEM_MIB - 200) << 20, events[-3:]
        # Deflated: the guest has its memory back.
        curl(sock, "PATCH", "/balloon", {"amount_mib": 0})
        assert actual_mib(sock, 0) == 0
        assert abs(mem_total_mib(g) - total) < 1
        # Free page hinting: a run takes the guest's free memory, touched before, from the host;
        # the guest's STOP ends it, and it has its pages back.
        g.check("dd if=/dev/zero of=/dev/null bs=360M count=1", timeout=300)
        touched = rss_mib(g)
        curl(sock, "PATCH", "/balloon/hinting/start", {})
        deadline = time.monotonic() + 120
        while (status := curl(sock, "GET", "/balloon/hinting/status")) != {"host_cmd": 1, "guest_cmd": 0}:
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        record_property("hinted_mib", round(touched - rss_mib(g)))
        assert touched - rss_mib(g) > 200, (touched, rss_mib(g))
        g.check("dd if=/dev/zero of=/dev/null bs=360M count=1", timeout=300)     # usable again
        assert g.poweroff(120) == 0
    finally:
        with contextlib.suppress(EOFError, OSError):    # the VMM, powered off, may have closed it first
            qmp.close()
        g.close()


def test_deflate_on_oom_and_free_page_reporting(kernel: debian.Kernel, initrd: Path, tmp_path: Path,
                                                record_property: Callable[[str, object], None]) -> None:
    g, sock = boot(kernel, initrd, tmp_path, {"amount_mib": 0, "deflate_on_oom": True,
                                              "stats_polling_interval_s": 1, "free_page_reporting": True})
    try:
        # Free page reporting: memory the guest touched and freed goes back to the host.
        g.check("dd if=/dev/zero of=/dev/null bs=360M count=1", timeout=300)
        touched = rss_mib(g)
        deadline = time.monotonic() + 60
        while rss_mib(g) > touched - 200 and time.monotonic() < deadline:
            time.sleep(1)
        record_property("reported_mib", round(touched - rss_mib(g)))
        assert touched - rss_mib(g) > 200, (touched, rss_mib(g))
        # The balloon takes most of the guest's memory; the guest, needing it, takes it back.
        curl(sock, "PATCH", "/balloon", {"amount_mib": 400})
        before = actual_mib(sock, 400)
        assert before > 300, before
        status, out = g.run("dd if=/dev/zero of=/dev/null bs=250M count=1", timeout=300)
        assert status == 0, out
        after = actual_mib(sock, -1, seconds=5)
        record_property("deflated_on_oom_mib", before - after)
        assert after < before - 100, (before, after)
        assert g.poweroff(120) == 0
    except subprocess.TimeoutExpired as e:
        raise g.fail(f"timed out: {e}") from e
    finally:
        g.close()
