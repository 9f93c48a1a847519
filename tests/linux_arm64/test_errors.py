"""What an arm64 VM cannot do is refused in one line, the VM unchanged: ACPI (x86_64's here; the
board describes itself in a device tree) at the command line and in JSON, and Firecracker's
SendCtrlAltDel (there is no i8042; Firecracker refuses it on aarch64 too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import GUEST, Vm, vms
from ..fcapi import Firecracker

__all__ = ["vms"]
pytestmark = pytest.mark.timeout(300)
PROBE = str(GUEST / "probe-arm64.Image")


@pytest.mark.parametrize("how", ["cmdline", "json"])
def test_acpi_is_a_usage_error(how: str, tmp_path: Path) -> None:
    if how == "cmdline":
        args = ["-kernel", PROBE, "-machine", "microvm,acpi=on"]
        where = "-machine acpi=on"
    else:
        config = tmp_path / "vm.json"
        config.write_text(json.dumps({"boot-source": {"kernel_image_path": PROBE},
                                      "machine-config": {"acpi": True}}))
        args = ["-config", str(config)]
        where = "machine-config.acpi=on"
    p = subprocess.run([sys.executable, "-m", "altovirt", *args], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"altovirt: error: {where}: ACPI is for x86_64 VMs; an aarch64 VM describes itself in a device "
        "tree (accepted: off)"], p.stderr
    ok = subprocess.run([sys.executable, "-m", "altovirt", "-kernel", PROBE, "-machine", "acpi=off",
                         "-append", "probe.run=info", "-serial", "stdio"], capture_output=True, text=True,
                        timeout=120, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0 and "probe: done ok" in ok.stdout, ok.stderr


def test_ctrl_alt_del_is_refused_and_the_vm_runs_on(tmp_path: Path, vms: list[Vm]) -> None:
    fc = Firecracker(vms, tmp_path / "api.sock")
    fc.ok("PUT", "/boot-source", {"kernel_image_path": PROBE, "boot_args": "probe.run=wait"})
    fc.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: waiting", 120)
    assert fc.fault("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == \
        "Ctrl-Alt-Del needs an i8042 keyboard, which an aarch64 VM has not; use system_powerdown"
    assert fc.state() == "Running"
    fc.close()


def test_cpu_templates_kvm_cannot_take_fail_the_start(tmp_path: Path, vms: list[Vm]) -> None:
    """A template whose register KVM will not take (an ID register's field it does not let
    userspace change, on this host's kernel) fails InstanceStart in one line, the process
    alive; the VM then starts with one KVM takes (vCPU features kept as they are)."""
    fc = Firecracker(vms, tmp_path / "api.sock")
    fc.ok("PUT", "/boot-source", {"kernel_image_path": PROBE, "boot_args": "probe.run=info"})
    fc.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128})
    assert "unknown field `cpuid_modifiers`" in fc.fault("PUT", "/cpu-config", {"cpuid_modifiers": []})
    fc.ok("PUT", "/cpu-config", {"reg_modifiers": [{"addr": "0x603000000013c020", "bitmap": "0b1111"}]})
    fault = fc.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    assert fault.startswith("Start microvm error: System configuration error: Failed to create guest config: "
                            "register 0x603000000013c020: "), fault
    assert fc.state() == "Not started"
    psci_0_2 = {"index": 0, "bitmap": "0bx1xx"}        # set, as AltoVirt sets it anyway
    fc.ok("PUT", "/cpu-config", {"kvm_capabilities": ["!70"], "vcpu_features": [psci_0_2]})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: done ok", 120)
    fc.close()
