"""The bundled probe (guest/probe-arm64.Image) under AltoVirt on arm64 KVM: the fast proof of the
board's exit paths, as tests/test_probe_arm64.py proves the probe itself on QEMU's virt. It adds
the network (a tap in a namespace, tests/net_echo.py's responder behind it), 254 vCPUs, and
snapshots and live migration (tests/test_migration.py's QMP client). What differs from QEMU
there is what a VMM must do: the boot timer and the unclaimed page are MMIO exits AltoVirt
answers (no abort reaches the guest), and its slots are in its own order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from ..conftest import GUEST, ProbeReport, Vm, vms
from ..netns import NetNs
from ..test_migration import Guest, migrate_live, snapshot, wait_status, with_header
from ..test_probe_arm64 import RAM_BASE, TEXT_OFFSET, blk_words, run_interactive

GIC_SPI_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SPI = 32, 0x0A000000, 0x200, 16
__all__ = ["vms"]
pytestmark = pytest.mark.timeout(600)


def test_probe_under_altovirt(tmp_path: Path) -> None:
    image = GUEST / "probe-arm64.Image"
    assert image.exists(), "the host builds guest/probe-arm64.Image (make -C guest) before the bed runs"
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(200_000))
    disk = tmp_path / "disk.img"
    disk_data = os.urandom(1 << 20)
    disk.write_bytes(disk_data)
    console = tmp_path / "con.sock"
    tests = "info,smp,rng,blk,console,echo"
    cmdline = f"console=ttyAMA0 probe.run={tests}"
    cmd = [sys.executable, "-m", "altovirt", "-kernel", str(image), "-smp", "2", "-m", "256M",
           "-initrd", str(initrd), "-drive", f"id=d0,file={disk},serial=disk0", "-device", "virtio-rng",
           "-chardev", f"id=c0,path={console}", "-append", cmdline, "-serial", "stdio",
           "-D", str(tmp_path / "vmm.log")]
    code, out, err = run_interactive(cmd, console, timeout=300)
    r = ProbeReport.parse(out)
    assert r.done == "ok", out + err
    assert code == 0, err                           # PSCI SYSTEM_OFF ends the VMM with 0
    assert r.tests == dict.fromkeys(tests.split(","), "ok")

    # boot: the Image at its text_offset, what AltoVirt's device tree says
    assert r.line("boot=") == f"boot=image load={RAM_BASE + TEXT_OFFSET:#x}"
    assert r.values["cmdline"] == cmdline
    assert r.line("memory ") == f"memory {RAM_BASE:#x} {256 << 20:#x}"
    assert r.line("cpus ").startswith("cpus count=2 bsp=0x0 psci=hvc psci-version=1.")
    assert r.line("uart") == "uart pl011 0x9000000"
    words = dict(w.split("=") for w in r.line("initrd").split()[1:])
    data = initrd.read_bytes()
    assert int(words["size"]) == len(data) and int(words["crc32"], 16) == zlib.crc32(data)
    dtb = r.line("dtb ").split()
    assert int(dtb[1], 16) % 8 == 0 and dtb[3] == "version=17" and dtb[4] == "el=1"

    # AltoVirt's slots: the disk, the console, the entropy device, in that order from the first
    found = {}
    for ln in r.lines:
        if ln.startswith("probe: virtio-mmio "):
            _, _, base, irq, dev_id = ln.split()
            i = (int(base, 16) - VIRTIO_MMIO_BASE) // VIRTIO_MMIO_SIZE
            assert irq == f"irq={GIC_SPI_BASE + VIRTIO_MMIO_SPI + i}"
            found[int(dev_id.split("=")[1])] = i
    assert found == {2: 0, 3: 1, 4: 2}

    # the boot timer and the unclaimed page are MMIO exits AltoVirt answers: no abort
    assert not [ln for ln in r.lines if ln.startswith("probe: abort ")], out
    assert r.line("mmio-gap") == "mmio-gap read=0xffffffff"
    assert r.line("boottimer") == "boottimer 1 2"
    assert "boot timer" in (tmp_path / "vmm.log").read_text()

    assert r.line("smp ") == "smp cpus=2 expected=2 bsp=0x0"
    assert r.line("ap ") == "ap 1 mpidr=0x1 up"
    assert r.line("rng irq=").startswith(f"rng irq={GIC_SPI_BASE + VIRTIO_MMIO_SPI + 2} bytes=4096 nonzero=")
    blk = blk_words(r.line("blk0 "))
    assert blk["read-crc32"] == f"{zlib.crc32(disk_data[:4096]):#x}" and blk["serial"] == "disk0"
    assert {k: blk[k] for k in ("read", "write", "flush", "readback", "oob", "unknown")} == \
        {"read": "ok", "write": "ok", "flush": "ok", "readback": "ok", "oob": "ioerr", "unknown": "unsupp"}
    assert r.line("console rx=") == "console rx=ping from the host"
    assert r.line("echo hello") == "echo hello from the host"


def test_254_vcpus_past_the_low_redistributors() -> None:
    """StratoVirt's limit: 123 vCPUs' redistributors fit below the UART, as in QEMU's virt; the
    rest are in a second region above RAM, and PSCI CPU_ON brings every one up."""
    p = subprocess.run([sys.executable, "-m", "altovirt", "-kernel", str(GUEST / "probe-arm64.Image"),
                        "-smp", "254", "-m", "256M", "-append", "probe.run=smp", "-serial", "stdio"],
                       capture_output=True, text=True, timeout=500, stdin=subprocess.DEVNULL)
    r = ProbeReport.parse(p.stdout)
    assert p.returncode == 0 and r.done == "ok", p.stdout[-2000:] + p.stderr
    assert r.line("smp ") == "smp cpus=254 expected=254 bsp=0x0"


def test_probe_network_under_altovirt() -> None:
    """virtio-net on arm64: frames both ways through a tap, the echo responder on its far side,
    and a 4000-byte frame over merged receive buffers."""
    ns = NetNs(("tap0",))
    try:
        p = ns.run([sys.executable, "-m", "altovirt", "-kernel", str(GUEST / "probe-arm64.Image"),
                    "-netdev", "id=net0,netdev=tap0", "-append", "probe.run=net,net-big", "-serial", "stdio"],
                   timeout=300)
    finally:
        ns.close()
    r = ProbeReport.parse(p.stdout)
    assert p.returncode == 0 and r.tests == {"net": "ok", "net-big": "ok"}, p.stdout[-2000:] + p.stderr
    assert r.line("net-big") == "net-big bytes=4000 num_buffers=2 match=1"
    assert r.line("net mac=").endswith(" link=1 tx=32 rx=32")


def test_probe_snapshot_restore_and_live_migration(tmp_path: Path, vms: list[Vm]) -> None:
    """The probe counting and rewriting 4 MiB of RAM, with a disk queue in use: saved, restored
    (the counter carries on, the queue is where the driver left it), then migrated live to
    another process while it writes, every page arriving: the vCPU registers, the GIC and
    the PL011 it talks through carried each time."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))

    def args(*more: str) -> list[str]:
        return ["-kernel", str(GUEST / "probe-arm64.Image"), "-smp", "2", "-m", "256M",
                "-append", "console=ttyAMA0 probe.run=snapshot", "-serial", "stdio",
                "-drive", f"id=disk0,file={disk}", *more]

    source = Guest(vms, args(), tmp_path / "q1.sock")
    source.ask("dirty 1024", "dirty")
    before = source.count()
    first_read = source.ask("blk", "blk")
    snapshot(source, tmp_path / "snap")
    source.quit()
    # Saved on another architecture or another kind of CPU: refused in one line, nothing runs.
    state = (tmp_path / "snap" / "state").read_bytes()
    for change, problem in (
            (lambda head: {**head, "machine": "x86_64"}, "header: saved on an x86_64 host; this aarch64 "
             "host cannot run it"),
            (lambda head: {**head, "cpu": {**head["cpu"], "midr": head["cpu"]["midr"] ^ 0xFF0_0000}},
             "header: saved on a CPU with MIDR_EL1 ")):
        shutil.copytree(tmp_path / "snap", tmp_path / "bad", dirs_exist_ok=True)
        (tmp_path / "bad" / "state").write_bytes(with_header(state, change))
        vm = Vm(*args("-incoming", f"file:{tmp_path / 'bad'}"))
        vms.append(vm)
        status, err = vm.finish()
        errors = [line for line in err.splitlines() if not line.startswith("altovirt: WARNING: ")]
        assert status == 1 and len(errors) == 1 and problem in errors[0], err      # (L1's /tmp: no O_DIRECT)
        assert not any(line.startswith("probe: snap") for line in vm.seen)
    restored = Guest(vms, args("-incoming", f"file:{tmp_path / 'snap'}"), tmp_path / "q2.sock", ready=False)
    wait_status(restored, "paused", timeout=120)
    restored.cmd("cont")
    assert restored.count() > before
    assert restored.ask("blk", "blk") == first_read
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dest = Guest(vms, args("-incoming", uri), tmp_path / "q3.sock", ready=False)
    restored.cmd("migrate-set-parameters", **{"downtime-limit": 500, "max-bandwidth": 0})
    info = migrate_live(restored, uri)
    assert info["status"] == "completed", info
    wait_status(dest, "paused", timeout=120)
    dest.cmd("cont")
    assert dest.ask("verify", "verify").startswith("probe: snap verify=ok pages=1024")
    assert dest.ask("blk", "blk") == first_read
    restored.quit()
    dest.quit()
