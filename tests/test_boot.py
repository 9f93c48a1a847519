"""Boot the probe guest on KVM in every kernel format and check what it reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.config.validate import parse_size
from altovirt.memory import HUGE_PAGE, GuestMemory

from .conftest import ROOT, ProbeReport, Vm, altovirt_cmd, needs_kvm, run_altovirt

pytestmark = needs_kvm

# image -> (what the probe calls the boot path, where the image was loaded, protocol, loader type)
FORMATS = {
    "probe.bzImage": ("bzimage", 0x100000, 0x20F, 0xFF),
    "probe.bin": ("raw", 0x1000000, 0x20F, 0xFF),
    "probe64.elf": ("elf64", 0x1000000, 0x20F, 0xFF),
    "probe.elf": ("pvh", 0x1000000, 1, 0),
}


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(os.urandom(300_000))
    return path


def check_report(r: ProbeReport, image: str, cpus: int, mem: int, cmdline: str, initrd: Path | None) -> None:
    kind, load, protocol, loader = FORMATS[image]
    assert r.line("boot=") == f"boot={kind} load={load:#x}"
    assert r.line("protocol=") == f"protocol={protocol:#x} loader={loader:#x}"
    assert r.values["cmdline"] == cmdline + " pci=off"
    expected_e820 = layout.e820_map(layout.ram_regions(mem))
    assert r.e820 == expected_e820
    assert int(r.values["ram"]) == sum(s for _, s, t in expected_e820 if t == layout.E820_RAM)
    assert r.line("mptable") == (
        f"mptable addr=0x9fc00 entries={cpus + 28} cpus={cpus} bsp=0 lapic=0xfee00000 ioapics=1 "
        "ioapic=0xfec00000 intsrc=24 lintsrc=2 checksum=ok")
    if initrd is None:
        assert r.line("initrd") == "initrd none"
    else:
        data = initrd.read_bytes()
        words = dict(w.split("=") for w in r.line("initrd").split()[1:])
        assert int(words["size"]) == len(data) and int(words["crc32"], 16) == zlib.crc32(data)
        assert int(words["addr"], 16) % 4096 == 0
        assert int(words["addr"], 16) + len(data) <= min(mem, 0x80000000)
    assert r.line("boottimer") == "boottimer 1 2"
    assert r.line("mmio-gap") == "mmio-gap read=0xffffffff"     # unclaimed MMIO reads as all ones


@pytest.mark.parametrize("image", list(FORMATS))
@pytest.mark.parametrize("cpus, mem", [(1, "128M"), (2, "5G")])
def test_boot_formats(probe: Path, initrd: Path, image: str, cpus: int, mem: str) -> None:
    cmdline = "console=ttyS0 probe.run=info,smp"
    run = run_altovirt("-kernel", str(probe / image), "-smp", str(cpus), "-m", mem,
                       "-initrd", str(initrd), "-append", cmdline, "-serial", "stdio")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    check_report(run.report, image, cpus, parse_size("-m", mem), cmdline, initrd)
    assert run.report.tests == {"info": "ok", "smp": "ok"}
    assert run.report.line("smp ") == f"smp cpus={cpus} expected={cpus} bsp=0"
    aps = sorted(ln for ln in run.report.lines if " ap " in f" {ln[7:]}")
    assert [ln.split()[3] for ln in aps] == sorted(f"apic={i}" for i in range(1, cpus))
    assert run.report.done == "ok"


def test_many_vcpus(probe: Path) -> None:
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-smp", "8", "-m", "256M",
                       "-append", "probe.run=smp", "-serial", "stdio", timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.report.line("smp ") == "smp cpus=8 expected=8 bsp=0"


def test_cmdline_passes_through_unchanged(probe: Path) -> None:
    """The user's words come first, as given; the machine adds pci=off (it has no PCI bus)."""
    cmdline = 'probe.run=info root=/dev/vda quote="a b" path=/x,y=z ünïcode'
    run = run_altovirt("-kernel", str(probe / "probe.bzImage"), "-append", cmdline, "-serial", "stdio")
    assert run.returncode == 0 and run.report.values["cmdline"] == cmdline + " pci=off"
    mine = "probe.run=info pci=nomsi"
    run = run_altovirt("-kernel", str(probe / "probe.bzImage"), "-append", mine, "-serial", "stdio")
    assert run.returncode == 0 and run.report.values["cmdline"] == mine


def test_default_run_is_info_without_serial_output(probe: Path, tmp_path: Path) -> None:
    """Without -serial stdio the guest runs just the same; only the log sees it."""
    log = tmp_path / "vm.log"
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-D", str(log))
    assert run.returncode == 0 and run.stdout == "" and run.stderr == ""
    text = log.read_text()
    assert "boot timer: value=0x1 at" in text and "boot timer: value=0x2 at" in text
    assert "stopping: guest-reset" in text


def test_json_config_boot(probe: Path, initrd: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(probe / "probe64.elf"),
                        "boot_args": "console=ttyS0 probe.run=info,smp", "initrd_fs_path": str(initrd)},
        "machine-config": {"name": "abc", "vcpu_count": 2, "mem_size": 268435456},
        "serial": {"stdio": True}}))
    run = run_altovirt("-config", str(cfg))
    assert run.returncode == 0, run.stderr
    check_report(run.report, "probe64.elf", 2, 256 << 20, "console=ttyS0 probe.run=info,smp", initrd)
    assert run.report.done == "ok"


def test_triple_fault_is_a_guest_reset(probe: Path, tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-append", "probe.run=triplefault",
                       "-serial", "stdio", "-D", str(log))
    assert run.returncode == 0
    assert run.report.lines[-1] == "probe: triple fault now"
    text = log.read_text()
    assert "triple fault (KVM_EXIT_SHUTDOWN), treated as a guest reset" in text
    assert "rip=" in text and "stopping: guest-reset" in text


def test_runtime_errors_are_one_line(probe: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    run = run_altovirt("-kernel", str(empty))
    assert run.returncode == 1
    assert run.stderr == f"altovirt: error: -kernel: {empty}: kernel image is empty\n"
    run = run_altovirt("-kernel", str(probe / "probe.bzImage"), "-append", "x" * 3000)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().endswith(
        "kernel command line is 3008 bytes with what the machine adds to -append; "
        "this kernel accepts at most 2047")


def test_serial_input_reaches_the_guest(probe: Path, vms: list[Vm]) -> None:
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=echo", "-serial", "stdio")
    vms.append(vm)
    vm.wait_line("probe: echo ready")
    assert vm.proc.stdin is not None
    vm.proc.stdin.write(b"hello from the host\n")
    vm.proc.stdin.flush()
    vm.wait_line("probe: echo hello from the host")
    code, err = vm.finish()
    assert code == 0 and err == ""
    assert "probe: done ok" in vm.seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_vm_cleanly(probe: Path, tmp_path: Path, vms: list[Vm], sig: int) -> None:
    log = tmp_path / "vm.log"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-smp", "2", "-append", "probe.run=smp,wait",
            "-serial", "stdio", "-D", str(log))
    vms.append(vm)
    vm.wait_line("probe: waiting")
    vm.proc.send_signal(sig)
    code, err = vm.finish()
    assert code == 128 + sig and err == ""
    text = log.read_text()
    assert "stopping: host-signal" in text and f"stopped: host-signal (exit {128 + sig})" in text


def test_daemonize_and_pidfile(probe: Path, tmp_path: Path) -> None:
    pidfile, log = tmp_path / "vm.pid", tmp_path / "vm.log"
    p = subprocess.run(altovirt_cmd("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait",
                                    "-daemonize", "-pidfile", str(pidfile), "-D", str(log)),
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 20
        while "value=0x2" not in log.read_text():      # the guest is running
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert os.getsid(pid) != os.getsid(0)            # detached into its own session
        os.kill(pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the daemon did not exit on SIGTERM")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not pidfile.exists()
    assert "stopped: host-signal (exit 143)" in log.read_text()


def test_daemonize_reports_start_failure(tmp_path: Path) -> None:
    empty, pidfile = tmp_path / "empty", tmp_path / "vm.pid"
    empty.write_bytes(b"")
    p = subprocess.run(altovirt_cmd("-kernel", str(empty), "-daemonize", "-pidfile", str(pidfile)),
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr == f"altovirt: error: -kernel: {empty}: kernel image is empty\n"
    assert not pidfile.exists()


def _ram_vmflags(pid: int) -> str:
    """The VmFlags of the guest RAM mapping: the one mapping not copied on fork ("dc")."""
    with open(f"/proc/{pid}/smaps") as f:
        flags = [ln for ln in f.read().splitlines() if ln.startswith("VmFlags:") and " dc" in ln]
    assert len(flags) == 1, f"guest RAM mapping not found in {flags}"
    return flags[0]


def test_ram_is_laid_out_for_huge_pages() -> None:
    """KVM maps 2 MiB of guest RAM with one nested-paging entry only where host and guest
    addresses agree modulo 2 MiB, below and above the MMIO gap alike."""
    mem = GuestMemory(layout.ram_regions(5 << 30))
    try:
        assert len(mem.regions) == 2
        for r in mem.regions:
            assert (mem.host_address(r) - r.gpa) % HUGE_PAGE == 0
    finally:
        mem.close()


@pytest.mark.parametrize("omit", [True, False])
def test_omit_vm_memory(probe: Path, vms: list[Vm], omit: bool) -> None:
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            *(["-omit_vm_memory"] if omit else []))
    vms.append(vm)
    vm.wait_line("probe: waiting")
    flags = _ram_vmflags(vm.proc.pid)
    assert (" dd" in flags) == omit
    assert " hg" in flags           # MADV_HUGEPAGE: transparent huge pages where the host has them
    vm.proc.terminate()
    assert vm.finish()[0] == 143
