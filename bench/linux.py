#!/usr/bin/env python3
"""Linux guest benchmark: Debian's stock kernel and the test initramfs on AltoVirt and on QEMU
microvm (ACPI on for both), on the same KVM, with the same devices:

  * boot to init (VMM start to the init's first command) and boot to power-off,
  * sequential disk write and read of --disk-mib MiB with O_DIRECT (dd, 1 MiB blocks),
  * (--parts disk-engines) the same, and 4 KiB reads one and four at a time, with each VMM's
    thread pool and its io_uring (AltoVirt's io_engine Async),
  * TCP throughput of --net-mib MiB each way over a tap in a private network namespace, in 64 KiB
    writes (the guest's tcp tool), and of --small-mib MiB from the guest in busybox nc's 1 KiB writes,
    with the VMM serving the NIC and again with the host kernel serving it (vhost=on on both),
  * exits to user space per boot (KVM's kvm_userspace_exit, kvm_pio and kvm_mmio tracepoints,
    counted by ftrace histograms), by reason and by port or address: where the time goes,
  * virtio-fs (QEMU's virtiofsd) against ext4 on virtio-blk, in the same guest: a stream of
    --fs-mib MiB written and read, and --files small files created, read and deleted,
  * live migration (total time, downtime, MiB sent) of a 2-vCPU, 512 MiB guest that keeps
    writing memory, a snapshot of it (save time, size) and its restore to running.

Each figure but the exits is the median of --runs, the VMMs taking turns. With
``--transport pci`` (x86_64) the devices are on PCI on both (AltoVirt's -machine q35, QEMU's
microvm with pcie=on), and AltoVirt with its virtio-mmio devices runs too, for the ratio
PCI/MMIO.

It needs a /dev/kvm that boots stock kernels; on a PVM host it runs itself inside the nested
test bed (scripts/testbed), where everything is emulated and so slow, but alike for both VMMs.
With ``--arch aarch64`` it boots Debian's arm64 kernel on AltoVirt and on QEMU's virt (GICv3)
in the arm64 test bed (boot, disk, the two net parts and snapshots: the others are x86's for now).

    .venv/bin/python bench/linux.py [--runs 3] [--disk-mib 256] [--net-mib 64] [--append pci=off]
    .venv/bin/python bench/linux.py --transport pci --parts boot,disk,net,fs
    .venv/bin/python bench/linux.py --arch aarch64 [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from common import ROOT

sys.path.insert(0, str(ROOT))
from tests.conftest import HARDWARE_VIRT_PROBLEM
from tests.linux.conftest import ARCH, GUEST_IP, HOST_IP, PREFIX, Netns, Qmp
from tests.testbed import arch, debian, guest, initramfs, l1

TRACING = Path("/sys/kernel/tracing")
TRACE_EVENTS = {"kvm_userspace_exit": "reason", "kvm_pio": "port", "kvm_mmio": "gpa"}
# The VMMs compared, in turn: "altovirt" and "qemu" with virtio-mmio devices, "-pci" with PCI.
VMMS = ["altovirt", "qemu"]
EXTRA_APPEND: list[str] = []    # --append: kernel parameters for both VMMs


def argv_for(vmm: str, k: debian.Kernel, initrd: Path, append: str, disk: Path | None,
             tap: str | None, vhost: bool = False, cpus: int = 1, qmp: Path | None = None,
             fs: Path | None = None, aio: str = "threads") -> list[str]:
    """The same machine on both VMMs: ``cpus`` vCPUs, 512 MiB, serial on stdio, optional disk
    (served with ``aio``: threads or io_uring), NIC (served by the host kernel if ``vhost``),
    QMP socket, and virtio-fs (tag ``bench``) from the virtiofsd listening on ``fs``, with
    guest RAM in a shared memfd."""
    on = ",vhost=on" if vhost else ""
    cmdline = " ".join([ARCH.guest_append, *EXTRA_APPEND, append]).strip()
    pci = vmm.endswith("-pci")
    bus = "pci" if pci else "device"
    if vmm.startswith("altovirt"):
        argv = [*common.altovirt(), "-kernel", str(k.vmlinuz), "-initrd", str(initrd), "-append", cmdline,
                "-smp", str(cpus), "-m", "512M", "-serial", "stdio"]
        if pci or fs:
            argv += ["-machine", ",".join(["q35" if pci else "microvm", *(["mem-share=on"] if fs else [])])]
        if disk:
            argv += ["-drive", f"id=d0,file={disk},aio={aio},if=none",
                     "-device", f"virtio-blk-{bus},drive=d0,id=vda"]
        if tap:
            argv += ["-netdev", f"tap,id=n0,ifname={tap}{on}",
                     "-device", f"virtio-net-{bus},netdev=n0,id=net0"]
        if qmp:
            argv += ["-api-channel", f"unix:{qmp}"]
        if fs:
            argv += ["-chardev", f"socket,id=fs,path={fs}",
                     "-device", f"vhost-user-fs-{bus},chardev=fs,tag=bench,id=fs0"]
        return argv
    machine = "microvm,memory-backend=mem" if fs else "microvm"
    if pci:
        machine += ",pcie=on"
    if ARCH.name == "aarch64":      # virt with a GICv3 and modern virtio-mmio, as AltoVirt's board
        machine = "virt,gic-version=3,memory-backend=mem" if fs else "virt,gic-version=3"
    argv = [common.qemu(), "-M", machine, "-accel", "kvm", "-cpu", "host", "-smp", str(cpus), "-m", "512M",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-kernel", str(k.vmlinuz), "-initrd", str(initrd), "-append", cmdline]
    if ARCH.name == "aarch64":
        argv += ["-no-reboot", "-global", "virtio-mmio.force-legacy=false"]
    if fs:
        # virtiofsd (libvhost-user) serves modern virtio only; QEMU's virtio-mmio is legacy by default.
        argv += ["-global", "virtio-mmio.force-legacy=false",
                 "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                 "-chardev", f"socket,id=fs,path={fs}",
                 "-device", f"vhost-user-fs-{bus},chardev=fs,tag=bench"]
    if qmp:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if disk:
        # The page cache on both: AltoVirt falls back to it where O_DIRECT is refused (tmpfs).
        argv += ["-drive", f"id=d0,file={disk},format=raw,if=none,aio={aio}",
                 "-device", f"virtio-blk-{bus},drive=d0"]
    if tap:
        argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no{on}",
                 "-device", f"virtio-net-{bus},netdev=n0"]
    return argv


def boot_times(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path) -> tuple[float, float]:
    """(s to the init's command, s to the VMM's exit) for a guest that runs /bin/true and powers off."""
    start = time.monotonic()
    with guest.LinuxGuest(argv_for(vmm, k, initrd, "guest.run=/bin/true", None, None),
                          log_path=tmp / f"{vmm}-boot.log") as g:
        g.wait_for("ALTOVIRT-GUEST-EXIT 0", 600)
        at_init = time.monotonic() - start
        status = g.wait_exit(120)
        if status != 0:
            raise SystemExit(f"bench: {vmm} exited {status} after the guest's poweroff")
        return at_init, time.monotonic() - start


def _trace(event: str, trigger: str) -> None:
    (TRACING / "events" / "kvm" / event / "trigger").write_text(trigger)


def exits_per_boot(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path) -> dict[str, list[tuple[int, str]]]:
    """Per tracepoint, (count, key) for one boot to power-off, most frequent first."""
    if not (TRACING / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACING)], check=True)
    for event, key in TRACE_EVENTS.items():
        _trace(event, f"hist:keys={key}:vals=hitcount:sort=hitcount.descending:size=4096")
    try:
        boot_times(vmm, k, initrd, tmp)
        tables = {}
        for event in TRACE_EVENTS:
            text = (TRACING / "events" / "kvm" / event / "hist").read_text()
            rows = re.findall(r"\{ \w+:\s*(\S+)\s*\} hitcount:\s*(\d+)", text)
            tables[event] = [(int(n), key) for key, n in rows]
        return tables
    finally:
        for event, key in TRACE_EVENTS.items():
            _trace(event, f"!hist:keys={key}:vals=hitcount:sort=hitcount.descending:size=4096")


def seconds_in_guest(g: guest.LinuxGuest, command: str) -> float:
    out = g.check(f"s=$(cut -d' ' -f1 /proc/uptime); {{ {command}; }} >/dev/null 2>&1; "
                  "e=$(cut -d' ' -f1 /proc/uptime); echo $s $e", timeout=900)
    start, end = (float(x) for x in out.split())
    return end - start


def disk_mbps(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path, mib: int) -> tuple[float, float]:
    """(write, read) MiB/s of sequential 1 MiB O_DIRECT transfers on vda."""
    image = tmp / f"{vmm}-disk.img"
    with open(image, "wb") as f:
        # Allocated, as an image in use is: otherwise the writes measure the host allocating
        # file pages, which made the first VM of each test bed twice as fast as the rest.
        os.posix_fallocate(f.fileno(), 0, (mib + 16) << 20)
    with guest.LinuxGuest(argv_for(vmm, k, initrd, "", image, None), log_path=tmp / f"{vmm}-disk.log") as g:
        g.wait_ready(600)
        write = seconds_in_guest(g, f"dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct")
        read = seconds_in_guest(g, f"dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct")
    image.unlink()
    return mib / write, mib / read


def net_mbps(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path, mib: int,
             small_mib: int, vhost: bool = False) -> tuple[float, float, float]:
    """(guest to host, host to guest, guest to host in 1 KiB writes) MiB/s of one TCP stream.

    The guest's end is the test guest's ``tcp`` tool, which moves 64 KiB per system call as
    iperf does; the last figure is busybox nc's 1 KiB writes, where a slow guest's own system
    calls and one frame per write set the pace."""
    ns = Netns("tap0")
    try:
        ns.address("tap0", f"{HOST_IP}/{PREFIX}")
        argv = [*ns.prefix, *argv_for(vmm, k, initrd, f"guest.ip={GUEST_IP}/{PREFIX}", None, "tap0", vhost)]
        with guest.LinuxGuest(argv, log_path=tmp / f"{vmm}-net.log") as g:
            g.wait_ready(600)
            sink = ns.receiver(5001, mib << 20)
            tx = seconds_in_guest(g, f"tcp send {HOST_IP} 5001 {mib << 20}")
            _check_received(sink, mib)
            sink = ns.receiver(5003, small_mib << 20)
            small = seconds_in_guest(g, f"dd if=/dev/zero bs=64k count={small_mib * 16} | nc {HOST_IP} 5003")
            _check_received(sink, small_mib)
            g.check("tcp recv -b 5002 > /tmp/received")
            start = time.monotonic()
            ns.run("socat", "-u", f"OPEN:/dev/zero,readbytes={mib << 20}",
                   f"TCP:{GUEST_IP}:5002,retry=40,interval=0.5", timeout=900)
            rx = time.monotonic() - start
            got = g.check("while pidof tcp >/dev/null; do sleep 0.1; done; cat /tmp/received", timeout=60)
            if got.strip() != str(mib << 20):
                raise SystemExit(f"bench: {vmm}: the guest received {got.strip()!r} bytes, not {mib << 20}")
    finally:
        ns.close()
    return mib / tx, mib / rx, small_mib / small


FS_STREAM = "dd if=/dev/zero of={d}/big bs=1M count={mib} conv=fsync"
FS_READ = "echo 3 > /proc/sys/vm/drop_caches; dd if={d}/big of=/dev/null bs=1M"
FS_CREATE = ("mkdir {d}/small && i=0; "
             "while [ $i -lt {n} ]; do echo file $i > {d}/small/f$i; i=$((i+1)); done; sync")
FS_LIST_READ = "echo 3 > /proc/sys/vm/drop_caches; cat {d}/small/* > /dev/null"
FS_DELETE = "rm -r {d}/small {d}/big; sync"


def fs_figures(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path, mib: int,
               files: int) -> tuple[float, ...]:
    """virtio-fs (QEMU's virtiofsd, cache=auto) against ext4 on virtio-blk in the same guest:
    for each, a streaming write (fsync'd) and read (cold cache) in MiB/s, then ``files`` small
    files created (and synced), read cold and deleted, in files/s."""
    share = tmp / f"{vmm}-share"
    share.mkdir()
    sock = tmp / f"{vmm}-vfs.sock"
    image = guest.make_ext4(tmp / f"{vmm}-ext4.img", f"{mib * 2 + 64}M")
    virtiofsd = subprocess.Popen(["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={share}",
                                  "-o", "cache=auto"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if virtiofsd.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: virtiofsd did not start")
            time.sleep(0.05)
        figures: list[float] = []
        with guest.LinuxGuest(argv_for(vmm, k, initrd, "", image, None, fs=sock),
                              log_path=tmp / f"{vmm}-fs.log") as g:
            g.wait_ready(600)
            g.check("mkdir -p /fs /blk && mount -t virtiofs bench /fs && mount /dev/vda /blk")
            for d in ("/fs", "/blk"):
                figures += [mib / seconds_in_guest(g, FS_STREAM.format(d=d, mib=mib)),
                            mib / seconds_in_guest(g, FS_READ.format(d=d)),
                            files / seconds_in_guest(g, FS_CREATE.format(d=d, n=files)),
                            files / seconds_in_guest(g, FS_LIST_READ.format(d=d)),
                            files / seconds_in_guest(g, FS_DELETE.format(d=d))]
    finally:
        virtiofsd.kill()
        virtiofsd.wait()
        shutil.rmtree(share)
        image.unlink()
    return tuple(figures)


def _check_received(sink: subprocess.Popen[str], mib: int) -> None:
    out, _ = sink.communicate(timeout=60)
    if int(out.split()[0]) != mib << 20:
        raise SystemExit(f"bench: the host received {out.split()[0]} bytes, not {mib << 20}")


def _qmp(path: Path) -> Qmp:
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: no QMP socket at {path}")
        time.sleep(0.01)
    return Qmp(path)


def _answer(q: Qmp, command: str, **args: object) -> Any:
    return q.ok(command, **args)["return"]


def _quit(q: Qmp) -> None:
    q.ok("quit")
    with contextlib.suppress(EOFError):     # qemu.qmp reports the close that quit asked for
        q.close()


def _migration(q: Qmp) -> dict[str, Any]:
    while (info := _answer(q, "query-migrate")).get("status") not in ("completed", "failed"):
        time.sleep(0.05)
    if info["status"] != "completed":
        raise SystemExit(f"bench: migration failed: {info}")
    return dict(info)


def _on_disk(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in ([path] if path.is_file() else path.iterdir()))


def snapshot_figures(vmm: str, k: debian.Kernel, initrd: Path, tmp: Path) -> tuple[float, ...]:
    """One booted guest (2 vCPUs, 512 MiB) rewriting 64 MiB at 20 MB/s (tests/linux/guest/dirty.c):
    live migration to a second process over a unix socket (300 ms downtime limit, no bandwidth
    cap): total s, downtime ms, MiB sent; then that VM paused and saved to a file: s, MiB on disk;
    then restored (AltoVirt: file: mapped, resume; QEMU: exec:cat, cont): ms from migrate-incoming
    to running."""
    d = tmp / f"{vmm}-snap"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    snap = d / "snap" if vmm == "altovirt" else d / "snap.qemu"

    def vm(name: str, *extra: str) -> guest.LinuxGuest:
        return guest.LinuxGuest([*argv_for(vmm, k, initrd, "", None, None, cpus=2, qmp=d / f"{name}.qmp"),
                                 *extra], log_path=d / f"{name}.log")

    with vm("a") as g:
        g.wait_ready(600)
        g.check("dirty 64 20 > /dev/null 2>&1 &")
        src = _qmp(d / "a.qmp")
        # The destination runs once it has the VM, as QEMU's does without -S.
        resume = ",resume=on" if vmm == "altovirt" else ""
        with vm("b", "-incoming", f"unix:{d / 'mig.sock'}{resume}") as g2:
            dst = _qmp(d / "b.qmp")
            src.ok("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 10 << 30})
            src.ok("migrate", uri=f"unix:{d / 'mig.sock'}")
            live = _migration(src)
            while _answer(dst, "query-status")["status"] != "running":
                time.sleep(0.05)
            dst.ok("stop")
            t = time.monotonic()
            dst.ok("migrate", uri=f"file:{snap}" if vmm == "altovirt" else f"exec:cat > {snap}")
            _migration(dst)
            save_s = time.monotonic() - t
            _quit(dst)
            g2.wait_exit(120)
        _quit(src)
    with vm("c", "-incoming", "defer") as g3:
        q = _qmp(d / "c.qmp")
        t = time.monotonic()
        if vmm == "altovirt":
            q.ok("migrate-incoming", uri=f"file:{snap}", resume=True)
        else:
            q.ok("migrate-incoming", uri=f"exec:cat {snap}")
            _migration(q)
            q.ok("cont")
        while _answer(q, "query-status")["status"] != "running":
            pass
        restore_ms = (time.monotonic() - t) * 1000
        g3.check("true", timeout=300)          # the guest's shell answers
        _quit(q)
    return (live["total-time"] / 1000, live["downtime"], live["ram"]["transferred"] / (1 << 20),
            save_s, _on_disk(snap) / (1 << 20), restore_ms)


# 4 KiB O_DIRECT reads: one dd (one request at a time), and four at once (four in flight).
SMALL_READS = "dd if=/dev/vda of=/dev/null bs=4k count={n} skip={skip} iflag=direct"


def disk_engine_figures(vmm: str, aio: str, k: debian.Kernel, initrd: Path, tmp: Path,
                        mib: int, reads: int) -> tuple[float, ...]:
    """With the disk served by ``aio``: sequential write and read (MiB/s, 1 MiB O_DIRECT), and
    4 KiB O_DIRECT reads a second, one at a time and four at a time."""
    image = tmp / f"{vmm}-{aio}.img"
    with open(image, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, (mib + 16) << 20)
    with guest.LinuxGuest(argv_for(vmm, k, initrd, "", image, None, aio=aio),
                          log_path=tmp / f"{vmm}-{aio}.log") as g:
        g.wait_ready(600)
        write = seconds_in_guest(g, f"dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct")
        read = seconds_in_guest(g, f"dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct")
        one = seconds_in_guest(g, SMALL_READS.format(n=reads, skip=0))
        # In a subshell, whose jobs the interactive shell does not report.
        four = seconds_in_guest(g, "(" + " & ".join(SMALL_READS.format(n=reads, skip=i * reads)
                                                   for i in range(4)) + " & wait)")
    image.unlink()
    return mib / write, mib / read, reads / one, 4 * reads / four


def engines(runs: int, measure: Callable[[str, str], tuple[float, ...]]) -> None:
    """Each VMM with each engine, ``runs`` times in turn; medians, and the ratios that matter."""
    configs = [(v, aio) for v in ("altovirt", "qemu") for aio in ("threads", "io_uring")]
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {c: [] for c in configs}
    for _ in range(runs):
        for c in configs:
            results[c].append(measure(*c))
    names = ("write MiB/s", "read MiB/s", "4k reads/s QD1", "4k reads/s QD4")
    med = {c: [statistics.median(r[i] for r in results[c]) for i in range(len(names))] for c in configs}
    print("\ndisk engines (threads: the worker pool; io_uring: AltoVirt's io_engine Async, "
          "QEMU's aio=io_uring)")
    for i, name in enumerate(names):
        row = "   ".join(f"{v} {aio} {med[(v, aio)][i]:9.1f}" for v, aio in configs)
        ring = med[("altovirt", "io_uring")][i]
        print(f"  {name:<16} {row}   AltoVirt io_uring/threads {ring / med[('altovirt', 'threads')][i]:4.2f}"
              f"   AltoVirt/QEMU io_uring {ring / med[('qemu', 'io_uring')][i]:4.2f}")


Pairs = dict[str, list[tuple[float, ...]]]


def alternate(runs: int, measure: Callable[[str], tuple[float, ...]]) -> Pairs:
    """``measure(vmm)`` ``runs`` times per VMM, alternating so that noise hits both alike."""
    results: Pairs = {v: [] for v in VMMS}
    for _ in range(runs):
        for vmm in VMMS:
            results[vmm].append(measure(vmm))
    return results


def report(title: str, unit: str, results: Pairs,
           names: tuple[str, ...], lower_is_better: bool) -> None:
    """Each VMM's medians; the ratio of the first to the last (AltoVirt to QEMU) and, with three,
    of the first to the second (AltoVirt's PCI to its virtio-mmio)."""
    print(f"\n{title}")
    width = max(22, *(len(n) for n in names))
    better = "lower is better" if lower_is_better else "higher is better"
    for i, name in enumerate(names):
        med = [statistics.median(r[i] for r in results[v]) for v in VMMS]
        figures = "   ".join(f"{v} {m:9.2f} {unit}" for v, m in zip(VMMS, med, strict=True))
        ratios = f"ratio to {VMMS[-1]} {med[0] / med[-1]:5.2f}"
        if len(VMMS) == 3:
            ratios += f", to {VMMS[1]} {med[0] / med[1]:5.2f}"
        print(f"  {name:<{width}} {figures}   {ratios} ({better})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--net-mib", type=int, default=64)
    ap.add_argument("--small-reads", type=int, default=2000, help="4 KiB reads per dd (disk-engines)")
    ap.add_argument("--small-mib", type=int, default=4, help="MiB sent in busybox nc's 1 KiB writes")
    ap.add_argument("--fs-mib", type=int, default=64, help="MiB streamed to and from each file system")
    ap.add_argument("--files", type=int, default=500, help="small files created, read and deleted")
    ap.add_argument("--parts", default=None, help="which measurements, comma-separated (default: "
                    "boot,disk,net,net-vhost,fs,exits,snapshot; disk-engines on request; on aarch64 "
                    "boot,disk,net,net-vhost,snapshot)")
    ap.add_argument("--arch", default=os.uname().machine, choices=tuple(arch.ARCHES),
                    help="the guests' and VMMs' machine: aarch64 on an x86 host runs in the arm64 test bed")
    ap.add_argument("--transport", default="mmio", choices=("mmio", "pci"),
                    help="the virtio transport; pci also runs AltoVirt on virtio-mmio (x86_64)")
    ap.add_argument("--append", default="", help="kernel parameters for both VMMs, e.g. pci=off "
                    "(which AltoVirt adds on its own) to give QEMU the same command line")
    args = ap.parse_args()
    EXTRA_APPEND.extend(args.append.split())
    if args.transport == "pci":
        VMMS[:] = ["altovirt-pci", "altovirt", "qemu-pci"]
    bed = arch.get(args.arch)
    if bed.name != ARCH.name or HARDWARE_VIRT_PROBLEM:
        why = HARDWARE_VIRT_PROBLEM.split(";")[0] if HARDWARE_VIRT_PROBLEM and bed is ARCH \
            else f"an {bed.name} guest on an {ARCH.name} host"
        print(f"bench: {why}; running in the {bed.name} nested test bed", flush=True)
        common.prepare()
        python = sys.executable if bed.native else "python3"
        r = l1.run([python, *sys.argv], timeout=7200, cwd=ROOT, stdout=sys.stdout.buffer,
                   stderr=sys.stderr.buffer, note=print, arch=bed)
        raise SystemExit(r.status)
    if ARCH.native or not os.environ.get("TESTBED_INITRD"):
        common.prepare()            # in a foreign test bed the host did (no compiler there)
    k = debian.kernel(ARCH)
    given = os.environ.get("TESTBED_INITRD")
    initrd = Path(given) if given and not ARCH.native else initramfs.build(k)
    tmp = Path(tempfile.mkdtemp(prefix="altovirt-bench-linux-"))
    print(f"kernel {k.release}, {os.cpu_count()} CPUs, runs={args.runs}, "
          f"append {' '.join([ARCH.guest_append, *EXTRA_APPEND])!r}", flush=True)
    # Not on arm64 yet: no virtiofsd in its test bed, and no port I/O to count.
    default = "boot,disk,net,net-vhost,snapshot" + ("" if ARCH.name == "aarch64" else ",fs,exits")
    parts = set((args.parts or default).split(","))
    if "boot" in parts:
        report("boot (1 vCPU, 512 MiB, no devices; s from VMM start)", "s",
               alternate(args.runs, lambda v: boot_times(v, k, initrd, tmp)),
               ("to init", "to power-off"), True)
    if "disk" in parts:
        report(f"disk ({args.disk_mib} MiB sequential, 1 MiB O_DIRECT blocks in the guest)", "MiB/s",
               alternate(args.runs, lambda v: disk_mbps(v, k, initrd, tmp, args.disk_mib)),
               ("write", "read"), False)
    if "disk-engines" in parts:
        engines(args.runs, lambda v, aio: disk_engine_figures(v, aio, k, initrd, tmp, args.disk_mib,
                                                               args.small_reads))
    if "net" in parts:
        report(f"net (one TCP stream: {args.net_mib} MiB in 64 KiB writes, {args.small_mib} MiB in 1 KiB)",
               "MiB/s",
               alternate(args.runs, lambda v: net_mbps(v, k, initrd, tmp, args.net_mib, args.small_mib)),
               ("guest to host", "host to guest", "guest to host, 1 KiB"), False)
    if "net-vhost" in parts:
        report(f"net, vhost=on on both ({args.net_mib} MiB in 64 KiB writes, {args.small_mib} MiB in 1 KiB)",
               "MiB/s",
               alternate(args.runs, lambda v: net_mbps(v, k, initrd, tmp, args.net_mib, args.small_mib,
                                                       vhost=True)),
               ("guest to host", "host to guest", "guest to host, 1 KiB"), False)
    if "fs" in parts:
        fs_initrd = initramfs.build(k, modules=(*initramfs.DEFAULT_MODULES, "virtiofs"))
        steps = ("stream write", "stream read", "files create", "files read", "files delete")
        names = tuple(f"{where} {what}" for where in ("virtio-fs", "ext4 on virtio-blk") for what in steps)
        report(f"virtio-fs and virtio-blk ({args.fs_mib} MiB streamed, then {args.files} small files; "
               "MiB/s or files/s)", "", alternate(args.runs, lambda v: fs_figures(v, k, fs_initrd, tmp,
                                                                                  args.fs_mib, args.files)),
               names, False)
    if "snapshot" in parts:
        report("snapshot and migration (2 vCPUs, 512 MiB, the guest rewriting 64 MiB at 20 MB/s)", "",
               alternate(args.runs, lambda v: snapshot_figures(v, k, initrd, tmp)),
               ("live total (s)", "live downtime (ms)", "live sent (MiB)", "save (s)", "snapshot (MiB)",
                "restore to running (ms)"), True)
    for vmm in VMMS if "exits" in parts else ():
        tables = exits_per_boot(vmm, k, initrd, tmp)
        print(f"\nexits per boot to power-off, {vmm}:")
        for event, rows in tables.items():
            top = ", ".join(f"{key}: {n}" for n, key in rows[:8])
            print(f"  {event:<19} {sum(n for n, _ in rows):8d}   {top}")


if __name__ == "__main__":
    main()
