"""What a Debian guest reads during live migrations arrives whole: the VMM writes that data into
guest RAM itself (virtio-blk completions on worker threads, virtio-net receive), where KVM's dirty
log does not see it, so a write noted before it lands would leave a stale page behind.

One guest (2 vCPUs, 512 MiB) migrates twice, from one tap on a bridge to the other and back,
while it keeps filling its page cache from a disk of random bytes and receives a TCP stream
from the host. After each move the cached disk hashes to the host's value; after the last, so
does the stream. (The stream once stalled here in most runs: the guest's driver read a used
index of 0 that the device never meant, took an old element for a new one ("output.0:id N is
not a head!") and stopped the NIC. CPython's struct.pack_into clears a field before writing
it, and the used ring was written that way; tests/test_virtqueue.py has the host-side proof.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv, migration_ends, wait_for_qmp

BOOT_TIMEOUT = 400
ROUNDS = 2              # a move onto each tap (a third took two minutes of the bed and repeated the first)
DATA_MIB = 48
STREAM_PORT = 5600
pytestmark = pytest.mark.timeout(1200)
# Reads the whole disk into the page cache again and again (the cache dropped before each round).
READER = ("(while :; do echo 1 > /proc/sys/vm/drop_caches; cat /dev/vdb > /dev/null; done) "
          "> /dev/null 2>&1 & echo $! > /tmp/reader.pid")
# The host end of the stream: random bytes until told to stop on stdin, then "<bytes> <md5>".
SENDER = ("import hashlib, os, select, socket, sys, time\n"
          "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=300)\n"
          "h, n = hashlib.md5(), 0\n"
          "print('connected', flush=True)\n"
          "while not select.select([sys.stdin], [], [], 0)[0]:\n"
          "    b = os.urandom(16384); s.sendall(b); h.update(b); n += len(b)\n"
          "    time.sleep(0.005)\n"
          "s.close(); print(n, h.hexdigest(), flush=True)\n")


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
    sender = None
    try:
        g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
        g.check(f"(nc -l -p {STREAM_PORT} | md5sum > /tmp/stream.md5 &) ; true")
        time.sleep(1)
        sender = subprocess.Popen([*host.ns.prefix, sys.executable, "-c", SENDER, GUEST_IP, str(STREAM_PORT)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert sender.stdout is not None and sender.stdout.readline() == "connected\n"
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
        assert sender.stdin is not None
        sender.stdin.write("stop\n")
        sender.stdin.flush()
        sent = sender.stdout.readline().split()
        assert sender.wait(60) == 0
        g_last = vms[-1][0]
        g_last.wait_until("test -s /tmp/stream.md5", "the stream's end", 120)
        assert g_last.check("cat /tmp/stream.md5").split()[0] == sent[1], f"{sent[0]} bytes sent"
        record_property("passes", passes)
        record_property("stream_mib", int(sent[0]) >> 20)
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        for vg, vq in vms:
            with contextlib.suppress(Exception):
                vq.close()
            vg.close()
