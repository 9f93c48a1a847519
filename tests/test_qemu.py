"""Differential tests: the same probe on QEMU microvm (the reference) and on AltoVirt.

QEMU boots the probe through its PVH note (qboot firmware); AltoVirt boots the
same ELF. Whatever does not depend on the machine model must agree: the
command line, the initrd bytes, the CPUs that come up and every test result.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from .conftest import ProbeReport, needs_qemu, run_altovirt, run_qemu

pytestmark = needs_qemu

# QEMU's isa-debug-exit turns the probe's "write 0 to port 0xf4" into exit status (0 << 1) | 1.
QEMU_POWEROFF_STATUS = 1


def initrd_of(r: ProbeReport) -> tuple[int, int]:
    words = dict(w.split("=") for w in r.line("initrd").split()[1:])
    return int(words["size"]), int(words["crc32"], 16)


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_probe_agrees_with_qemu(probe: Path, tmp_path: Path, cpus: int) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(200_000))
    cmdline = "console=ttyS0 probe.run=info,smp marker=differential"
    qemu = run_qemu(probe / "probe.elf", cmdline, smp=cpus, mem="256M", initrd=initrd)
    alto = run_altovirt("-kernel", str(probe / "probe.elf"), "-smp", str(cpus), "-m", "256M",
                        "-initrd", str(initrd), "-append", cmdline, "-serial", "stdio")
    assert qemu.returncode == QEMU_POWEROFF_STATUS, qemu.stderr
    assert alto.returncode == 0, alto.stderr
    q, a = qemu.report, alto.report
    for r in (q, a):
        assert r.line("boot=") == "boot=pvh load=0x1000000"
        assert r.line("protocol=") == "protocol=0x1 loader=0x0"
        assert r.values["cmdline"].removesuffix(" pci=off") == cmdline     # AltoVirt adds it
        assert initrd_of(r) == (len(initrd.read_bytes()), zlib.crc32(initrd.read_bytes()))
        assert 250 << 20 <= int(r.values["ram"]) <= 256 << 20
        assert r.line("smp ") == f"smp cpus={cpus} expected={cpus} bsp=0"
        assert r.line("boottimer") == "boottimer 1 2"
    assert q.tests == a.tests == {"info": "ok", "smp": "ok"}
    assert q.done == a.done == "ok"
    aps = [sorted(ln.split()[3] for ln in r.lines if ln.startswith("probe: ap ")) for r in (q, a)]
    assert aps[0] == aps[1] == sorted(f"apic={i}" for i in range(1, cpus))


def test_triple_fault_agrees_with_qemu(probe: Path) -> None:
    """Both treat a triple fault as a reset (QEMU with -no-reboot exits 0)."""
    qemu = run_qemu(probe / "probe.elf", "probe.run=triplefault")
    alto = run_altovirt("-kernel", str(probe / "probe.elf"), "-append", "probe.run=triplefault",
                        "-serial", "stdio")
    assert qemu.returncode == alto.returncode == 0
    assert qemu.report.lines[-1] == alto.report.lines[-1] == "probe: triple fault now"
