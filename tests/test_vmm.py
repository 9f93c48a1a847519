"""The VMM in-process: pausing every vCPU outside KVM_RUN and resuming it."""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from altovirt.config import load_config
from altovirt.vmm import builder
from altovirt.vmm.builder import open_kvm
from altovirt.vmm.machine import VmmError
from altovirt.vmm.vcpu import StopReason

from .conftest import needs_kvm

TEST_STOP = StopReason("test", False, 0)


def symbol(probe: Path, name: str) -> int:
    out = subprocess.run(["nm", str(probe / "probe.elf")], capture_output=True, text=True, check=True).stdout
    return next(int(ln.split()[0], 16) for ln in out.splitlines() if ln.endswith(" " + name))


@needs_kvm
def test_pause_and_resume(probe: Path) -> None:
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-smp", "2",
                                   "-append", "probe.run=smp,wait"]))
    counter = symbol(probe, "wait_counter")
    results: dict[str, Any] = {}

    def count() -> int:
        assert m.mem is not None
        return int(struct.unpack("<Q", m.mem.read(counter, 8))[0])

    def driver() -> None:
        try:
            deadline = time.monotonic() + 30
            while count() == 0:
                assert time.monotonic() < deadline, "the guest never started counting"
                time.sleep(0.01)
            m.pause()
            results["paused"] = [v.paused for v in m.vcpus]
            frozen = count()
            time.sleep(0.2)
            results["frozen"] = (frozen, count())
            results["rip"] = m.vcpus[0].vcpu.get_regs().rip    # registers readable while paused
            m.resume()
            time.sleep(0.2)
            results["after"] = count() - frozen
            results["resumed"] = [v.paused for v in m.vcpus]
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
        m.close()
    assert "error" not in results, results
    assert results["paused"] == [True, True]
    frozen, later = results["frozen"]
    assert frozen == later
    assert 0x1000000 <= results["rip"] < 0x1100000
    assert results["after"] > 0
    assert results["resumed"] == [False, False]


def test_missing_kvm_is_one_line() -> None:
    try:
        open_kvm("/nonexistent/kvm")
    except VmmError as e:
        assert str(e) == "/nonexistent/kvm: no such device; KVM is not available on this host"
    else:
        raise AssertionError("no error")
