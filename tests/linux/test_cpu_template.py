"""CPU templates as Debian's kernel sees them, set through altovirt-firecracker's API: a static
template this CPU is not allowed is refused at InstanceStart in Firecracker's words, and
Firecracker's T2A bits as a custom template (``PUT /cpu-config``) give Linux T2A's CPU: its
family and model, and none of the features T2A hides. Two boots: one without a template,
the reference, one with it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from altovirt.arch.x86_64.cpu_templates import STATIC, static_template
from altovirt.config.cpu_template import export

from ..testbed import debian, guest
from .conftest import ARCH, curl, curl_status, firecracker_guest, start_firecracker_guest

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(ARCH.name != "x86_64", reason="SKIPPED LOUDLY: T2A is an x86_64 template")]

# /proc/cpuinfo's names for some of the bits T2A clears: (leaf, register, bit) -> flag.
HIDDEN_FLAGS = {(0x1, "ecx", 3): "monitor", (0x1, "ecx", 15): "pdcm", (0x7, "ebx", 16): "avx512f",
                (0x7, "ebx", 19): "adx", (0x7, "ebx", 29): "sha_ni", (0x7, "ecx", 1): "avx512vbmi",
                (0x7, "ecx", 9): "vaes", (0x7, "ecx", 10): "vpclmulqdq",
                (0x80000001, "ecx", 2): "svm", (0x80000001, "ecx", 29): "mwaitx",
                (0x80000001, "edx", 26): "pdpe1gb", (0x80000008, "ebx", 9): "wbnoinvd"}


def cpuinfo(g: guest.LinuxGuest) -> tuple[set[str], int, int]:
    """The first CPU's flags, family and model, as Linux read them."""
    text = g.check("sed -n '1,/^$/p' /proc/cpuinfo")
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())  # type: ignore[union-attr]
    family = int(re.search(r"^cpu family\s*:\s*(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    model = int(re.search(r"^model\s*:\s*(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return flags, family, model


def test_hidden_flags_are_t2as() -> None:
    """Each flag the bed looks for is one T2A clears."""
    cleared = {(m.leaf, register, bit) for m in static_template("T2A").cpuid_modifiers
               for register, f in m.registers for bit in range(32)
               if f.filter >> bit & 1 and not f.value >> bit & 1}
    assert set(HIDDEN_FLAGS) <= cleared


def test_t2a_as_linux_sees_it(kernel: debian.Kernel, initrd: Path, tmp_path: Path,
                              record_property: Callable[[str, object], None]) -> None:
    (tmp_path / "plain").mkdir()
    g, sock = firecracker_guest(tmp_path / "plain")
    try:
        start_firecracker_guest(g, sock, kernel, initrd)
        before, family, model = cpuinfo(g)
    finally:
        g.close()

    (tmp_path / "t2a").mkdir()
    g, sock = firecracker_guest(tmp_path / "t2a")
    try:
        # This CPU (QEMU's emulated one) is neither a Milan nor an Intel that T2 is for: the
        # template of the other vendor is refused for its vendor, its own for the model.
        vendor = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
        assert vendor is not None
        for name in ("T2A", "T2"):
            curl(sock, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512, "cpu_template": name})
            curl(sock, "PUT", "/boot-source", {"kernel_image_path": str(kernel.vmlinuz)})
            code, answer = curl_status(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
            why = ("CPU vendor mismatched between actual CPU and CPU template."
                   if STATIC[name][0] != vendor[1] else
                   "The current CPU model is not permitted to apply the CPU template.")
            expected = f"Start microvm error: Failed to get CPU template: {why}"
            assert (code, answer) == (400, {"fault_message": expected})
        curl(sock, "PATCH", "/machine-config", {"cpu_template": "None"})
        start_firecracker_guest(g, sock, kernel, initrd, ("/cpu-config", export(static_template("T2A"))))
        after, family_t2a, model_t2a = cpuinfo(g)
        assert g.check("cat /proc/loadavg")          # the guest runs on with T2A's CPU
    finally:
        g.close()

    hidden = {flag for flag in HIDDEN_FLAGS.values() if flag in before}
    record_property("cpu", f"family {family} model {model} -> {family_t2a} {model_t2a}")
    record_property("hidden", " ".join(sorted(hidden)))
    assert (family_t2a, model_t2a) == (6, 0x3F)          # T2A's CPUID.1 EAX: 0x306F2
    assert len(hidden) >= 3, f"too few of T2A's hidden features on this CPU to tell: {sorted(before)}"
    assert not hidden & after, f"T2A should hide {sorted(hidden & after)}"
    assert {"sse2", "sse4_2", "aes"} & before <= after, "T2A keeps these"
