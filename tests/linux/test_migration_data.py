"""What a Debian guest reads during live migrations arrives whole: the VMM writes that data into
guest RAM itself (virtio-blk completions on worker threads, virtio-net receive), where KVM's dirty
log does not see it, so a write noted before it lands would leave a stale page behind.

One guest (2 vCPUs, 512 MiB) migrates three times between two taps on one bridge, while it keeps
filling its page cache from a disk of random bytes. After each move the cached disk hashes to the
host's value. (A TCP stream the guest receives meanwhile is not here yet. It stalls without any
migration too: the guest's driver finds a used-ring entry it had not posted ("output.0:id N is
not a head!", sometimes "input.0") and the NIC stops, within 30 s to 10 min, in 7 of 9 AltoVirt
runs in the bed with this disk reader beside it and in 4 of 4 without it; QEMU in the same bed
streamed 420 s cleanly in 3 runs of 3. The device's own bookkeeping saw nothing wrong (every
head it used was one it had popped); L1's transparent huge pages, a second guest vCPU and
VIRTIO_F_EVENT_IDX are not needed for it. Once, on a host running five L1s, this test failed on
its disk instead: the device answered reads with I/O errors that no host I/O error explains;
perhaps the same fault. Open.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv, migration_ends, wait_for_qmp

BOOT_TIMEOUT = 400
ROUNDS = 3
DATA_MIB = 48
pytestmark = pytest.mark.timeout(1200)
# Reads the whole disk into the page cache again and again (the cache dropped before each round).
READER = ("(while :; do echo 1 > /proc/sys/vm/drop_caches; cat /dev/vdb > /dev/null; done) "
          "> /dev/null 2>&1 & echo $! > /tmp/reader.pid")


class Host:
    """One network namespace: a bridge with the host's address and two taps, so that the guest
    keeps its TCP connections as it moves from one tap to the other."""

    TAPS = ("tapa", "tapb")

    def __init__(self) -> None:
        self.ns = Netns(*self.TAPS)
        commands = [["ip", "link", "add", "br0", "type", "bridge"],
                    ["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", "br0"],
                    ["ip", "link", "set", "br0", "up"]]
        for tap in self.TAPS:
            commands += [["ip", "link", "set", tap, "master", "br0"], ["ip", "link", "set", tap, "up"]]
        for args in commands:
            p = self.ns.run(*args)
            assert p.returncode == 0, (args, p.stderr)


def start(kernel: debian.Kernel, initrd: Path, d: Path, host: Host, name: str, tap: str,
          *extra: str) -> tuple[guest.LinuxGuest, Qmp]:
    argv = altovirt_argv(
        kernel, initrd, "-smp", "2", "-m", "512M",
        "-drive", f"id=rw,file={d / 'rw.img'}", "-drive", f"id=data,file={d / 'data.img'},readonly=on",
        "-netdev", f"id=n0,netdev={tap}", "-api-channel", f"unix:{d / name}.qmp",
        "-D", str(d / f"{name}.vmm.log"), *extra, append=f"guest.ip={GUEST_IP}/{PREFIX}")
    g = guest.LinuxGuest([*host.ns.prefix, *argv], log_path=d / f"{name}.serial.log")
    try:
        if not extra:
            g.wait_ready(BOOT_TIMEOUT)
        return g, wait_for_qmp(g, d / f"{name}.qmp")
    except BaseException:
        g.close()
        raise


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Path, Host]]:
    guest.make_ext4(tmp_path / "rw.img", "16M")
    (tmp_path / "data.img").write_bytes(os.urandom(DATA_MIB << 20))
    host = Host()
    try:
        yield tmp_path, host
    finally:
        host.ns.close()


def test_data_read_during_live_migrations_arrives_whole(
        kernel: debian.Kernel, initrd: Path, bed: tuple[Path, Host],
        record_property: Callable[[str, object], None]) -> None:
    d, host = bed
    data_md5 = hashlib.md5((d / "data.img").read_bytes()).hexdigest()
    g, qmp = start(kernel, initrd, d, host, "vm0", "tapa")
    vms = [(g, qmp)]
    try:
        g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
        passes = []
        for n in range(1, ROUNDS + 1):
            src_g, src_q = vms[-1]
            src_g.check(READER)
            time.sleep(2)
            tap = host.TAPS[n % 2]
            dst = start(kernel, initrd, d, host, f"vm{n}", tap, "-incoming", f"unix:{d / f'mig{n}.sock'}")
            vms.append(dst)
            src_q.ok("migrate-set-parameters", **{"downtime-limit": 100, "max-bandwidth": 0})
            src_q.ok("migrate", uri=f"unix:{d / f'mig{n}.sock'}")
            info = migration_ends(src_q)
            assert info["status"] == "completed", info
            passes.append(info["ram"]["dirty-sync-count"])
            record_property(f"round{n}_downtime_ms", info["downtime"])
            src_q.ok("quit")                # its tap leaves the bridge: frames go to the new one
            assert src_g.wait_exit(120) == 0
            dst_g, dst_q = dst
            deadline = time.monotonic() + 60
            while dst_q.ok("query-status")["return"]["status"] != "paused":     # type: ignore[index]
                assert time.monotonic() < deadline
                time.sleep(0.2)
            dst_q.ok("cont")
            # The pages cached while the VM moved are read back from memory, not the disk.
            dst_g.check("kill $(cat /tmp/reader.pid); sleep 1")
            assert dst_g.check("md5sum /dev/vdb", timeout=300).split()[0] == data_md5, f"round {n}"
        g_last = vms[-1][0]
        g_last.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)     # the network came along
        record_property("passes", passes)
    finally:
        for vg, vq in vms:
            with contextlib.suppress(Exception):
                vq.close()
            vg.close()
