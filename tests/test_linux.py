"""Linux guests on hosts whose /dev/kvm cannot boot them (PVM): tests/linux runs inside the
nested test bed (scripts/testbed, tests/testbed/l1.py), one module per L1 boot, and every
inner failure fails here.

One module per boot, so that a lost L1 (it wedges, or its kernel crashes: TCG's SVM emulation
has races, see tests/testbed/l1.py) costs that module's run and is retried once, not the
whole suite.  A module whose L1 is lost on every attempt FAILS, naming the losses: a lost L1
must never pass for a pass.  The only skips are for a missing resource, worded loudly.
"""

from __future__ import annotations

import compileall
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .conftest import HARDWARE_VIRT_PROBLEM, ROOT
from .testbed import debian, initramfs, l1

LINUX = ROOT / "tests" / "linux"
MODULES = sorted(path.name for path in LINUX.glob("test_*.py"))
# s for L1's boot and one module, on a host busy enough to give L1 a third of a core (a
# module takes 1-5 min on a quiet host); a lost L1 is retried once, so twice that at worst.
ATTEMPT_TIMEOUT = 1500
# The inner pytest loads only the plugin tests/linux uses: hypothesis and schemathesis (entry
# point plugins of the outer suite) take most of a minute to import under TCG, in every boot.
INNER_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
INNER_PYTEST = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "pytest_timeout"]

pytestmark = [
    pytest.mark.skipif(HARDWARE_VIRT_PROBLEM is None,
                       reason="this /dev/kvm boots Linux itself: tests/linux runs directly, not nested"),
    pytest.mark.skipif(shutil.which(l1.QEMU) is None,
                       reason="SKIPPED LOUDLY: qemu-system-x86_64 is missing, so the nested test bed "
                              "cannot run and no Linux guest test runs; run ./scripts/setup"),
]


@pytest.fixture(scope="module")
def warm_caches() -> None:
    """Do on the host, once, what every L1 boot would otherwise redo at TCG speed: compile
    the repository's Python to bytecode (L1 reads the host's files, and its own writes go to a
    tmpfs that ends with it) and build the guests' default initramfs into the bed's cache."""
    for tree in ("altovirt", "tests"):
        compileall.compile_dir(ROOT / tree, quiet=1)
    initramfs.build(debian.kernel())


def inner_figures(junit: Path) -> list[str]:
    """'test: name=value ...' for every inner test that recorded figures (record_property)."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        figures = [f"{p.get('name')}={p.get('value')}" for p in case.iter("property")]
        if figures:
            out.append(f"{case.get('name')}: {' '.join(figures)}")
    return out


def inner_failures(junit: Path) -> list[str]:
    """'name: message' for every inner test that failed or errored (the message's first
    lines: a GuestError's carry the serial log's tail)."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            message = "\n    ".join((bad.get("message") or "").splitlines()[:40])
            out.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return out


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.timeout(2 * ATTEMPT_TIMEOUT + 300)
def test_linux_guests_in_the_nested_test_bed(module: str, warm_caches: None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    junit = out / "junit.xml"
    notes: list[str] = []
    r = l1.run([*INNER_PYTEST, f"tests/linux/{module}", f"--junitxml={junit}"], env=INNER_ENV,
               timeout=ATTEMPT_TIMEOUT, cwd=ROOT, out_dir=out, log=tmp_path / "l1.log", note=notes.append)
    print(r.output.decode(errors="replace"))
    print("\n".join(notes), f"{module}: L1 boot {r.boot_seconds} s, {r.attempts} attempt(s), "
          f"{r.nudges.sent} nudge(s) ({r.nudges.revived} revived), {r.seconds:.0f} s in all")
    if r.bed_error is not None:         # L1 lost on every attempt, or the last one timed out
        why = [*r.failures, *([r.bed_error] if r.bed_error not in r.failures else [])]
        pytest.fail(f"{module} did not run to the end in the nested test bed ({r.attempts} attempt(s)): "
                    + "; ".join(why) + f"; L1 log {r.l1_log}")
    assert junit.exists(), f"the inner pytest wrote no report (status {r.status})"
    print("\n".join(f"figures: {line}" for line in inner_figures(junit)))
    failures = inner_failures(junit)
    assert not failures and r.status == 0, ("\n".join(failures) or f"inner pytest exited {r.status}") \
        + f"\nserial logs: {out / 'logs'}"
