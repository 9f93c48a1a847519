"""CPU templates, as Firecracker's clients set them: ``cpu_template`` in the machine
configuration (a static template, checked against the host's CPU at the start) and ``PUT
/cpu-config`` (a custom one), read with Firecracker's rules and words, applied to KVM's CPUID
and MSRs, and kept by a snapshot, whose header then records what the guest was given.

On this PVM host the guest runs CPUID natively, so what it sees is proven under Linux in the
bed (tests/linux/test_cpu_template.py); here the snapshot's header shows what KVM was given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from altovirt.config.cpu_template import (
    BitFilter,
    CpuidModifier,
    CpuTemplate,
    RegisterModifier,
    VcpuFeatures,
    export,
    parse,
    parse_bitmap,
    parse_number,
)
from altovirt.config.model import ConfigError
from altovirt.kvm import Kvm
from altovirt.snapshot import format as snapfile

from .conftest import Vm, needs_kvm
from .fcapi import Firecracker

x86_only = pytest.mark.skipif(os.uname().machine != "x86_64",
                              reason="SKIPPED LOUDLY: these templates are x86_64's (CPUID and MSRs)")


def test_bitmaps_as_firecracker_reads_them() -> None:
    assert parse_bitmap("0b1x0", 32) == BitFilter(0b101, 0b100)     # short: the high bits left alone
    assert parse_bitmap("0b1_x_0", 32) == parse_bitmap("1x0", 32)   # "_" separates, "0b" is optional
    assert parse_bitmap("0b" + "1" * 64, 64) == BitFilter((1 << 64) - 1, (1 << 64) - 1)
    assert BitFilter(0b0110, 0b0100).apply(0b1011) == 0b1101
    assert BitFilter(0b101, 0b100).bitmap(4) == "0bx1x0"
    with pytest.raises(ConfigError, match=r"^Failed to parse string \[0b1x0z\] as a bitmap - unknown "
                                          r"character: 122$"):
        parse_bitmap("0b1x0z", 32)
    with pytest.raises(ConfigError, match=r"as a bitmap - string is too long$"):
        parse_bitmap("0b" + "x" * 33, 32)
    assert parse_number("0x1f", 32) == 31 and parse_number("0b101", 32) == 5
    with pytest.raises(ConfigError, match=r"^No supported number system prefix found in value \[31\]"):
        parse_number("31", 32)
    with pytest.raises(ConfigError, match=r"ParseIntError \{ kind: PosOverflow \}$"):
        parse_number("0x100000000", 32)
    with pytest.raises(ConfigError, match=r"ParseIntError \{ kind: InvalidDigit \}$"):
        parse_number("0xfg", 32)


def _filters(bits: int) -> st.SearchStrategy[BitFilter]:
    word = st.integers(0, (1 << bits) - 1)
    return st.builds(lambda f, v: BitFilter(f, v & f), word, word)


_filters32, _filters64 = _filters(32), _filters(64)
_caps = st.lists(st.integers(0, (1 << 32) - 1).flatmap(lambda c: st.sampled_from([c, ~c])), max_size=3)


@given(caps=_caps,
       cpuid=st.lists(st.builds(CpuidModifier, st.integers(0, (1 << 32) - 1), st.integers(0, 3),
                                st.integers(0, 7),
                                st.lists(st.tuples(st.sampled_from(["eax", "ebx", "ecx", "edx"]), _filters32),
                                         max_size=4).map(tuple)), max_size=4),
       msrs=st.lists(st.builds(RegisterModifier, st.integers(0, (1 << 32) - 1), _filters64), max_size=3))
def test_x86_templates_read_back_what_they_write(caps: list[int], cpuid: list[CpuidModifier],
                                                 msrs: list[RegisterModifier]) -> None:
    t = CpuTemplate(tuple(caps), tuple(cpuid), tuple(msrs))
    assert parse(export(t, "x86_64"), "x86_64") == t


@given(features=st.lists(st.builds(VcpuFeatures, st.integers(0, 6), _filters32), max_size=3),
       regs=st.lists(st.builds(RegisterModifier, st.sampled_from([0x603000000013C020, 0x6030000000100040]),
                               _filters64), max_size=3))
def test_arm64_templates_read_back_what_they_write(features: list[VcpuFeatures],
                                                   regs: list[RegisterModifier]) -> None:
    t = CpuTemplate(vcpu_features=tuple(features), reg_modifiers=tuple(regs))
    assert parse(export(t, "aarch64"), "aarch64") == t


LEAF_7 = {"leaf": "0x7", "subleaf": "0x0", "flags": 1,
          "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxx00xxxxxxxxxxxxxxxxxxxxxxx"}]}


@pytest.mark.parametrize(("body", "message"), [
    ({"cpuid_modifiers": [], "reg_modifiers": []},
     "unknown field `reg_modifiers`, expected one of `kvm_capabilities`, `cpuid_modifiers`, `msr_modifiers`"),
    ({"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "modifiers": []}]}, "missing field `flags`"),
    ({"cpuid_modifiers": [{**LEAF_7, "modifiers": [{"register": "rax", "bitmap": "0b1"}]}]},
     "Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]"),
    ({"cpuid_modifiers": [{**LEAF_7, "leaf": 7}]}, "invalid type: integer `7`, expected a string"),
    ({"cpuid_modifiers": [{**LEAF_7, "flags": -1}]}, "invalid value: integer `-1`, expected u32"),
    ({"kvm_capabilities": ["!x"]},
     "Failed to parse string [!x] as a kvm capability - can not convert to numeric: invalid digit found in "
     "string"),
    ({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "0" * 65}]},
     "Failed to parse string [0b" + "0" * 65 + "] as a bitmap - string is too long"),
    ({"cpuid_modifiers": {}}, "invalid type: map, expected a sequence"),
])
def test_custom_template_errors_in_serdes_words(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(body, "x86_64")
    assert str(e.value) == message


def _host() -> tuple[str, int]:
    """The host CPU's vendor and CPUID.1 EAX (family, model, stepping), as KVM reports them."""
    kvm = Kvm("/dev/kvm")
    try:
        leaves = {(e.function, e.index): e for e in kvm.supported_cpuid()}
    finally:
        kvm.close()
    zero = leaves[(0, 0)]
    vendor = b"".join(r.to_bytes(4, "little") for r in (zero.ebx, zero.edx, zero.ecx)).decode()
    return vendor, leaves[(1, 0)].eax & 0x0FFF0FFF


def boot(fc: Firecracker, probe: Path, run: str = "info") -> None:
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": f"console=ttyS0 probe.run={run}"})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})


@x86_only
@needs_kvm
def test_static_templates_only_on_their_cpus(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """T2 and T2A are accepted by the machine configuration and shown by it; the start refuses
    the one whose vendor this host is not, and T2A unless the host is a Milan, in Firecracker's
    words; the same process then starts without a template."""
    vendor, fms = _host()
    fc = Firecracker(vms, tmp_path / "api.sock")
    machine = {"vcpu_count": 1, "mem_size_mib": 128}
    assert fc.fault("PUT", "/machine-config", {**machine, "cpu_template": "T3"}) == (
        "An error occurred when deserializing the json body of a request: unknown variant `T3`, expected one "
        "of `C3`, `T2`, `T2S`, `None`, `T2CL`, `T2A`.")
    other = "T2" if vendor == "AuthenticAMD" else "T2A"
    fc.ok("PUT", "/machine-config", {**machine, "cpu_template": other})
    assert fc.ok("GET", "/machine-config") == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                               "track_dirty_pages": False, "huge_pages": "None",
                                               "cpu_template": other}
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": "console=ttyS0 probe.run=info"})
    assert fc.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "Start microvm error: Failed to get CPU template: CPU vendor mismatched between actual CPU and CPU "
        "template.")
    if vendor == "AuthenticAMD" and fms != 0x00A00F11:
        fc.ok("PUT", "/machine-config", {**machine, "cpu_template": "T2A"})
        assert fc.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
            "Start microvm error: Failed to get CPU template: The current CPU model is not permitted to "
            "apply the CPU template.")
    fc.ok("PATCH", "/machine-config", {"cpu_template": "None"})
    assert "cpu_template" not in fc.ok("GET", "/machine-config")  # type: ignore[operator]
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: done ok")


def _leaf_7_ebx() -> int:
    kvm = Kvm("/dev/kvm")
    try:
        return next(e.ebx for e in kvm.supported_cpuid() if (e.function, e.index) == (7, 0))
    finally:
        kvm.close()


def _snapshot(fc: Firecracker, d: Path) -> dict[str, Any]:
    """Pause, snapshot into ``d``; the snapshot's header."""
    fc.ok("PATCH", "/vm", {"state": "Paused"})
    fc.ok("PUT", "/snapshot/create", {"snapshot_path": str(d / "vm.state"),
                                      "mem_file_path": str(d / "vm.mem")})
    return snapfile.read_state(snapfile.SnapshotFiles(str(d / "vm.state"), str(d / "vm.mem")))[0]


@x86_only
@needs_kvm
def test_custom_template_reaches_kvm_and_stays_with_a_snapshot(probe: Path, tmp_path: Path,
                                                               vms: list[Vm]) -> None:
    """A template that hides two leaf-7 features: the snapshot's header records the CPU without
    them (so the snapshot loads on a host that lacks them); loaded in a new process, the VM
    keeps its template, which its own snapshot shows again."""
    hidden = 3 << 23                    # CLFLUSHOPT and CLWB: this host's KVM offers them
    assert _leaf_7_ebx() & hidden, "the host's KVM does not offer the features the test hides"
    fc = Firecracker(vms, tmp_path / "one.sock")
    fc.ok("PUT", "/cpu-config", {"kvm_capabilities": ["!56"], "cpuid_modifiers": [LEAF_7]})
    fc.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    boot(fc, probe, "snapshot")
    fc.vm.wait_line("probe: snap ready")
    (tmp_path / "a").mkdir()
    header = _snapshot(fc, tmp_path / "a")
    assert header["cpu"]["features"]["0x7.0"][0] == _leaf_7_ebx() & ~hidden
    fc.vm.proc.kill()
    fc.vm.proc.wait()

    fc = Firecracker(vms, tmp_path / "two.sock")
    fc.ok("PUT", "/snapshot/load", {"snapshot_path": str(tmp_path / "a" / "vm.state"),
                                    "mem_file_path": str(tmp_path / "a" / "vm.mem"), "resume_vm": True})
    fc.vm.type("count")
    fc.vm.wait_line("probe: snap count=")
    (tmp_path / "b").mkdir()
    assert _snapshot(fc, tmp_path / "b")["cpu"] == header["cpu"]


@x86_only
@needs_kvm
def test_templates_kvm_cannot_take(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """A leaf, an MSR or a capability KVM does not have fails the start, in Firecracker's
    words; the process stays, and starts once the template is one KVM takes (an MSR it has)."""
    fc = Firecracker(vms, tmp_path / "api.sock")
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": "console=ttyS0 probe.run=info"})
    for template, message in [
            ({"cpuid_modifiers": [{**LEAF_7, "leaf": "0x4fffffff"}]},
             "System configuration error: Failed to create guest config: Template changes a CPUID entry not "
             "supported by KVM: Leaf: 4fffffff, Subleaf: 0"),
            ({"msr_modifiers": [{"addr": "0xdeadbeef", "bitmap": "0b1"}]},
             "System configuration error: Failed to create guest config: Template changes an MSR entry not "
             "supported by KVM: Register Address: deadbeef"),
            ({"kvm_capabilities": ["4000"]}, "Kvm error: Missing KVM capabilities: 0xfa0")]:
        fc.ok("PUT", "/cpu-config", template)
        start = fc.fault("PUT", "/actions", {"action_type": "InstanceStart"})
        assert start == f"Start microvm error: {message}"
        assert fc.state() == "Not started"
    fc.ok("PUT", "/cpu-config", {"msr_modifiers": [{"addr": "0xc0000103", "bitmap": "0b101"}]})   # TSC_AUX
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: done ok")
    assert "not supported after starting" in fc.fault("PUT", "/cpu-config", {})
