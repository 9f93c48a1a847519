"""The VMM in-process: pausing every vCPU outside KVM_RUN and resuming it."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from altovirt.backends import blockfile
from altovirt.config import load_config
from altovirt.devices.virtio import block as vblk
from altovirt.vmm import builder
from altovirt.vmm.actions import Pause, QueryVcpus, Resume
from altovirt.vmm.builder import open_kvm
from altovirt.vmm.lifecycle import StateError
from altovirt.vmm.machine import Machine, VcpuInfo, VmmError
from altovirt.vmm.run import WithoutTracebacks
from altovirt.vmm.vcpu import StopReason

from .conftest import needs_kvm

TEST_STOP = StopReason("test", False, 0)


def symbol(probe: Path, name: str) -> int:
    out = subprocess.run(["nm", str(probe / "probe.elf")], capture_output=True, text=True, check=True).stdout
    return next(int(ln.split()[0], 16) for ln in out.splitlines() if ln.endswith(" " + name))


def drive(m: Machine, steps: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run ``m`` on this (the main) thread while ``steps(results)`` runs on another and then
    stops the VM; ``results`` holds what the steps recorded, and "error" if they failed."""
    results: dict[str, Any] = {}

    def driver() -> None:
        try:
            steps(results)
        except BaseException as e:
            results["error"] = e
        finally:
            m.request_stop(TEST_STOP)

    t = threading.Thread(target=driver)
    t.start()
    try:
        assert m.run() == TEST_STOP
    finally:
        t.join()
    return results


@needs_kvm
def test_pause_and_resume(probe: Path) -> None:
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-smp", "2",
                                   "-append", "probe.run=smp,wait"]))
    counter = symbol(probe, "wait_counter")

    def count() -> int:
        assert m.mem is not None
        return int(struct.unpack("<Q", m.mem.read(counter, 8))[0])

    def steps(results: dict[str, Any]) -> None:
        deadline = time.monotonic() + 30
        while count() == 0:
            assert time.monotonic() < deadline, "the guest never started counting"
            time.sleep(0.01)
        m.request(Pause())         # as QMP asks: carried out on the main thread
        results["paused"] = [v.paused for v in m.vcpus]
        frozen = count()
        time.sleep(0.2)
        results["frozen"] = (frozen, count())
        results["rip"] = m.vcpus[0].vcpu.get_regs().rip    # registers readable while paused
        m.request(Resume())
        time.sleep(0.2)
        results["after"] = count() - frozen
        results["resumed"] = [v.paused for v in m.vcpus]

    try:
        results = drive(m, steps)
    finally:
        m.close()
    assert "error" not in results, results
    assert results["paused"] == [True, True]
    frozen, later = results["frozen"]
    assert frozen == later
    assert 0x1000000 <= results["rip"] < 0x1100000
    assert results["after"] > 0
    assert results["resumed"] == [False, False]


@needs_kvm
def test_a_pause_that_a_stuck_disk_holds_up_fails_and_the_guest_runs_on(
        probe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk write that does not complete: the pause gives up with an error naming the disk,
    and the VM is left running as it was (no STOP with requests in flight)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    monkeypatch.setattr(vblk, "QUIESCE_TIMEOUT", 0.3)
    writing, go_on = threading.Event(), threading.Event()
    real = blockfile._pwritev

    def stuck_pwritev(fd: int, iov: int, count: int, offset: int) -> int:
        writing.set()
        go_on.wait(30)
        return int(real(fd, iov, count, offset))

    monkeypatch.setattr(blockfile, "_pwritev", stuck_pwritev)
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={disk}",
                                   "-append", "probe.run=blkbench"]))
    events: list[str] = []
    m.add_event_listener(lambda event, data: events.append(event))

    def steps(results: dict[str, Any]) -> None:
        assert writing.wait(30), "the guest never wrote to its disk"
        try:
            m.request(Pause())
        except StateError as e:
            results["error_text"] = str(e)
        deadline = time.monotonic() + 5
        while any(v.paused for v in m.vcpus) and time.monotonic() < deadline:
            time.sleep(0.01)        # a resumed vCPU clears its flag as it wakes
        results["after_failure"] = (m.state.value, [v.paused for v in m.vcpus], list(events))
        go_on.set()
        m.request(Pause())         # the disk has caught up: the pause goes through
        results["paused"] = m.state.value

    try:
        results = drive(m, steps)
    finally:
        go_on.set()
        m.close()
    assert "error" not in results, results
    assert results["error_text"].startswith("cannot stop the guest: d0: ")
    assert "still in flight after 0.3 s" in results["error_text"]
    assert results["after_failure"] == ("running", [False], [])
    assert results["paused"] == "paused"


@needs_kvm
def test_actions_are_answered_until_the_vmm_stops(probe: Path) -> None:
    """What the API asks runs on the main thread and comes back; a refusal is a StateError;
    once the VMM has stopped, every request is refused instead of waiting forever."""
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-smp", "2",
                                   "-append", "probe.run=wait"]))

    def steps(results: dict[str, Any]) -> None:
        infos = cast(list[VcpuInfo], m.request(QueryVcpus()))
        results["info"] = [(i.index, i.thread_id > 0) for i in infos]
        with pytest.raises(StateError, match="the VM is running, not paused"):
            m.request(Resume())

    try:
        results = drive(m, steps)
        late: dict[str, BaseException | None] = {}
        asker = threading.Thread(target=lambda: late.update(error=catch(lambda: m.request(Pause()))))
        asker.start()
        asker.join(10)
        assert not asker.is_alive()
        assert isinstance(late["error"], StateError) and str(late["error"]) == "the VM is shutting down"
    finally:
        m.close()
    assert "error" not in results, results
    assert results["info"] == [(0, True), (1, True)]


def catch(action: Callable[[], object]) -> BaseException | None:
    try:
        action()
    except BaseException as e:
        return e
    return None


def test_missing_kvm_is_one_line() -> None:
    try:
        open_kvm("/nonexistent/kvm")
    except VmmError as e:
        assert str(e) == "/nonexistent/kvm: no such device; KVM is not available on this host"
    else:
        raise AssertionError("no error")


def test_a_terminal_gets_an_errors_line_without_its_traceback() -> None:
    """What a terminal's handler shows of a failure (the command line's stderr, a forked VM's
    without a log of its own): the line, not the traceback, which the record keeps for a log."""
    inner = logging.Formatter("%(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("altovirt.test").makeRecord(
            "altovirt.test", logging.ERROR, __file__, 1, "vCPU %d failed", (0,), sys.exc_info())
    assert WithoutTracebacks(inner).format(record) == "altovirt.test: vCPU 0 failed"
    assert "Traceback" in inner.format(record) and "ValueError: boom" in inner.format(record)
