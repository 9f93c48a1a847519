"""Linux guests on hosts whose /dev/kvm cannot boot them: tests/linux (Debian's amd64 kernel)
runs inside the x86 nested test bed where this /dev/kvm is PVM, and tests/linux_arm64 (Debian's
arm64 kernel) inside the arm64 test bed on any x86 host (scripts/testbed, tests/testbed/l1.py),
one module per L1 boot (a few short ones share one), and every inner failure fails here.

Two L1s run at once (:data:`LANES`): each has one vCPU (tests/testbed/l1.py says why), so one
alone leaves a host core idle.  Each lane takes the next run, the longest first (:data:`SECONDS`),
so that they end together; each test waits for its run's outcome.

One module per boot, so that a lost L1 (it wedges, or its kernel crashes: TCG's SVM emulation
has races, see tests/testbed/l1.py) costs that module's run (or its group's) and is retried
once, not the whole suite.  A run whose L1 is lost on every attempt FAILS, naming the losses: a lost L1
must never pass for a pass.  The only skips are for a missing resource, worded loudly.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import queue
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from .conftest import GUEST, HARDWARE_VIRT_PROBLEM, ROOT
from .testbed import arch, debian, initramfs, l1

# (the bed's architecture, the directory of its modules, the Python that runs them in L1):
# the x86 bed shares the host's root and so its .venv; the arm64 bed's root has Debian's python3.
BEDS = ((arch.X86_64, "linux", sys.executable), (arch.AARCH64, "linux_arm64", "python3"),
        (arch.AARCH64_GICV2, "linux_arm64_gicv2", "python3"))
# Short modules that share one L1 boot, which costs 15-25 s before a test runs (an arm64
# one its guest's initramfs too): a lost L1 costs the group's run.
SHARED_BOOTS = {
    "linux": (("test_cpu_template.py", "test_mmds.py", "test_rate_limiter.py"),
              ("test_firecracker.py", "test_kata.py", "test_qemu_reference.py")),
    "linux_arm64": (("test_bed.py", "test_errors.py", "test_probe.py", "test_probe_devices.py",
                     "test_qemu_reference.py"),),
}


def _runs(d: str) -> list[tuple[str, ...]]:
    """The modules of tests/``d``, in name order, each with those it shares an L1 boot with."""
    groups = SHARED_BOOTS.get(d, ())
    grouped = {m for g in groups for m in g}
    alone = [(p.name,) for p in (ROOT / "tests" / d).glob("test_*.py") if p.name not in grouped]
    return sorted([*groups, *alone])


MODULES = [(a, tuple(f"{d}/{m}" for m in run), python) for a, d, python in BEDS for run in _runs(d)]
IDS = [f"{a.key}-{'+'.join(m)}" for a, m, _ in MODULES]
# L1s at once: the host's two cores (ALTOVIRT_BED_LANES=1 runs them one after another).
LANES = int(os.environ.get("ALTOVIRT_BED_LANES", "2"))
# About how long a run takes, by its first module (two lanes, 2026-12): the order the lanes take
# them in. Others are taken last, in name order.
SECONDS = {
    "linux/test_pci.py": 470, "linux/test_snapshot.py": 340, "linux/test_migration_data.py": 330,
    "linux/test_balloon.py": 320, "linux_arm64/test_snapshot.py": 320, "linux/test_cpu_template.py": 310,
    "linux/test_firecracker.py": 290, "linux_arm64/test_pci.py": 260, "linux_arm64/test_bed.py": 250,
}
# s for L1's boot and one module, on a host busy enough to give L1 a third of a core (a
# module takes 1-5 min on a quiet host); a lost L1 is retried once, so twice that at worst.
ATTEMPT_TIMEOUT = 1500
# The inner pytest loads only the plugin tests/linux uses: hypothesis and schemathesis (entry
# point plugins of the outer suite) take most of a minute to import under TCG, in every boot.
INNER_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
INNER_ARGS = ["-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "pytest_timeout"]


def _why_not(bed: arch.Arch) -> str | None:
    """Why the modules of ``bed`` do not run in its test bed here, or None."""
    if bed.name == os.uname().machine and HARDWARE_VIRT_PROBLEM is None:
        return f"this /dev/kvm boots {bed.name} Linux itself: its modules run directly, not nested"
    if bed.name != os.uname().machine and os.uname().machine != "x86_64":
        return f"the {bed.name} test bed runs on x86_64 hosts"
    if shutil.which(bed.qemu) is None:
        return (f"SKIPPED LOUDLY: {bed.qemu} is missing, so the {bed.name} test bed cannot run and no "
                f"{bed.name} Linux guest test runs; run ./scripts/setup")
    return None


@pytest.fixture(scope="module")
def warm_caches() -> None:
    """Do on the host, once, what every L1 boot would otherwise redo at TCG speed: compile
    the repository's Python to bytecode (L1 reads the host's files, and its own writes go to a
    tmpfs that ends with it), build the probe guests (tests/linux_arm64 boots the arm64 one)
    and the guests' default initramfs into the bed's cache."""
    for tree in ("altovirt", "tests"):
        compileall.compile_dir(ROOT / tree, quiet=1)
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True, capture_output=True)
    initramfs.build(debian.kernel())        # the arm64 bed builds its guest's on every run


class Run:
    """One L1 boot's run of some modules: its output directory, its notes, and its outcome."""

    def __init__(self, bed: arch.Arch, modules: tuple[str, ...], python: str, tmp: Path) -> None:
        self.bed, self.modules, self.python, self.tmp = bed, modules, python, tmp
        self.notes: list[str] = []
        self.result: Future[l1.Result] = Future()

    def __call__(self) -> None:
        if not self.result.set_running_or_notify_cancel():
            return
        try:
            self.result.set_result(l1.run(
                [self.python, *INNER_ARGS, *(f"tests/{m}" for m in self.modules),
                 f"--junitxml={self.tmp / 'out' / 'junit.xml'}"],
                env=INNER_ENV, timeout=ATTEMPT_TIMEOUT, cwd=ROOT, out_dir=self.tmp / "out",
                log=self.tmp / "l1.log", note=self.notes.append, arch=self.bed))
        except BaseException as e:      # a bug here must fail its test, not end the lane silently
            self.result.set_exception(e)


def _lane(runs: queue.SimpleQueue[Run]) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            runs.get_nowait()()


@pytest.fixture(scope="module")
def bed_runs(request: pytest.FixtureRequest, warm_caches: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Run]]:
    """The runs of this session's selected bed tests that can run here, by modules, started
    on :data:`LANES` threads; at the end, those not yet started are cancelled and the lanes
    joined."""
    selected = {item.callspec.id for item in request.session.items if isinstance(item, pytest.Function)
                and item.originalname == test_linux_guests_in_the_nested_test_bed.__name__}
    runs = {m: Run(a, m, python, tmp_path_factory.mktemp("bed"))
            for (a, m, python), id_ in zip(MODULES, IDS, strict=True)
            if id_ in selected and _why_not(a) is None}
    waiting: queue.SimpleQueue[Run] = queue.SimpleQueue()
    for run in sorted(runs.values(), key=lambda r: -SECONDS.get(r.modules[0], 0)):
        waiting.put(run)
    lanes = [threading.Thread(target=_lane, args=(waiting,), name=f"bed-lane-{n}", daemon=True)
             for n in range(max(1, LANES))]
    for lane in lanes:
        lane.start()
    yield runs
    for run in runs.values():
        run.result.cancel()
    for lane in lanes:
        lane.join()


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


@pytest.mark.parametrize(("bed", "modules", "python"), MODULES, ids=IDS)
@pytest.mark.timeout(2 * ATTEMPT_TIMEOUT + 300)
def test_linux_guests_in_the_nested_test_bed(bed: arch.Arch, modules: tuple[str, ...], python: str,
                                             bed_runs: dict[tuple[str, ...], Run]) -> None:
    why_not = _why_not(bed)
    if why_not:
        pytest.skip(why_not)
    run = bed_runs[modules]
    r = run.result.result()
    out = r.out_dir
    junit = out / "junit.xml"
    module = " ".join(modules)
    print(r.output.decode(errors="replace"))
    print("\n".join(run.notes), f"{module}: L1 boot {r.boot_seconds} s, {r.attempts} attempt(s), "
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
