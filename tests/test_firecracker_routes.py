"""Firecracker's clients, unchanged: its routing rules (read from Firecracker 1.16's
``parsed_request.rs`` and ``request/*.rs``), and its process identity (the name a client finds
the VMM by, its threads' names)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from altovirt.api.firecracker_routes import Route, route
from altovirt.config.firecracker import FirecrackerError

from .conftest import Vm, needs_kvm
from .fcapi import Firecracker

INVALID = "Invalid request method and/or path: "
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."

# (method, path, has a body) -> the operation and the id it takes, or the 400's fault_message.
ROUTES: list[tuple[str, str, bool, Route | str]] = [
    # Trailing segments are ignored where the operation takes none (a client's PUT /vsock/vsock0).
    ("PUT", "/vsock/vsock0", True, Route("put_vsock", "vsock")),
    ("PUT", "/vsock", True, Route("put_vsock", "vsock")),
    ("GET", "/version/x/y", False, Route("get_version", "version")),
    ("PATCH", "/vm/anything", True, Route("patch_vm", "vm")),
    ("PUT", "//actions/", True, Route("put_actions", "actions")),      # leading '/'s trimmed, one trailing
    ("GET", "/", False, Route("get_info", "")),
    ("GET", "", False, Route("get_info", "")),
    # Ids in paths: checked before the body, by Unicode's alphanumerics and '_', no length limit.
    ("PUT", "/drives/rootfs", True, Route("put_drive", "drives", "rootfs")),
    ("PUT", "/drives/root_fs/extra", True, Route("put_drive", "drives", "root_fs")),
    ("PUT", "/drives/" + "d" * 100, True, Route("put_drive", "drives", "d" * 100)),
    ("PUT", "/drives/dísk1", True, Route("put_drive", "drives", "dísk1")),
    ("PUT", "/drives", True, "The ID cannot be empty."),
    ("PUT", "/drives/", True, "The ID cannot be empty."),
    ("PUT", "/drives//x", True, "The ID cannot be empty."),
    ("PUT", "/drives/a-b", True, INVALID_ID),
    ("PATCH", "/network-interfaces/eth.0", True, INVALID_ID),
    ("PATCH", "/network-interfaces/eth0", True,
     Route("patch_network_interface", "network-interfaces", "eth0")),
    ("DELETE", "/drives/d1", False, Route("delete_drive", "drives", "d1")),
    ("DELETE", "/drives", False, "The ID cannot be empty."),
    ("PUT", "/pmem/p0", True, Route("put_pmem", "pmem", "p0")),
    # Bodies: where none belongs, or none where one must be, whatever the path.
    ("GET", "/", True, "GET request cannot have a body."),
    ("GET", "/nowhere", True, "GET request cannot have a body."),
    ("PUT", "/boot-source", False, "Empty PUT request."),
    ("PUT", "/nowhere", False, "Empty PUT request."),
    ("PATCH", "/vm", False, "Empty PATCH request."),
    ("DELETE", "/drives/d1", True, "Empty Delete request."),
    # Unknown paths name their first segment alone.
    ("GET", "/nowhere/at/all", False, INVALID + "GET nowhere."),
    ("PUT", "/nowhere", True, INVALID + "PUT nowhere."),
    ("GET", "/vm", False, INVALID + "GET vm."),
    ("GET", "/vm/state", False, INVALID + "GET vm."),
    ("GET", "/vm/config", False, Route("get_vm_config", "vm")),
    ("PUT", "/vm", True, INVALID + "PUT vm."),
    ("GET", "/drives/d1", False, INVALID + "GET drives."),
    ("DELETE", "/vsock", False, INVALID + "DELETE vsock."),
    ("POST", "/actions", True, INVALID + "POST actions."),
    ("PUT", "/hotplug", True, INVALID + "PUT hotplug."),
    ("PUT", "/hotplug/memory", True, Route("put_hotplug_memory", "hotplug")),
    # Snapshots: the operation is the second segment.
    ("PUT", "/snapshot/create", True, Route("put_snapshot_create", "snapshot")),
    ("PUT", "/snapshot/load/x", True, Route("put_snapshot_load", "snapshot")),
    ("PUT", "/snapshot/fork", True, Route("put_snapshot_fork", "snapshot")),          # AltoVirt's
    ("PUT", "/snapshot", True, "Missing snapshot operation type."),
    ("PUT", "/snapshot/delete", True, INVALID + "PUT /snapshot/delete."),
    # MMDS and the balloon's sub-resources.
    ("PUT", "/mmds", True, Route("put_mmds", "mmds")),
    ("PUT", "/mmds/config", True, Route("put_mmds_config", "mmds")),
    ("PUT", "/mmds/other", True, "Unrecognized PUT request path `other`."),
    ("PATCH", "/mmds/config", True, Route("patch_mmds", "mmds")),
    ("GET", "/mmds/latest/meta-data", False, Route("get_mmds", "mmds")),
    ("GET", "/balloon", False, Route("get_balloon", "balloon")),
    ("GET", "/balloon/statistics", False, Route("get_balloon_statistics", "balloon")),
    ("GET", "/balloon/stats", False, "Unrecognized GET request path `stats`."),
    ("GET", "/balloon/hinting/status", False, Route("get_balloon_hinting_status", "balloon")),
    ("GET", "/balloon/hinting", False, "Unrecognized GET request path `/hinting/`."),
    ("PATCH", "/balloon", True, Route("patch_balloon", "balloon")),
    ("PATCH", "/balloon/anything", True, Route("patch_balloon", "balloon")),
    ("PATCH", "/balloon/statistics", True, Route("patch_balloon_statistics", "balloon")),
    ("PATCH", "/balloon/statistics", False, "Empty PATCH request."),
    ("PATCH", "/balloon", False, "Empty PATCH request."),
    ("PATCH", "/balloon/hinting/start", False, Route("patch_balloon_hinting_start", "balloon")),
    ("PATCH", "/balloon/hinting/stop", True, Route("patch_balloon_hinting_stop", "balloon")),
    ("PATCH", "/balloon/hinting/go", True, "Unrecognized PATCH request path `/hinting/go`."),
]


@pytest.mark.parametrize(("method", "path", "has_body", "expected"), ROUTES)
def test_routes_as_firecrackers_parser(method: str, path: str, has_body: bool, expected: Route | str) -> None:
    if isinstance(expected, Route):
        assert route(method, path, has_body) == expected
    else:
        with pytest.raises(FirecrackerError) as e:
            route(method, path, has_body)
        assert str(e.value) == expected


def _thread_names(pid: int) -> dict[int, str]:
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names[int(tid)] = f.read().strip()
    return names


@needs_kvm
def test_process_keeps_firecrackers_name(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """Run as ``firecracker`` (a link, as clients install it), the process keeps that name for
    its life (psutil's name() and pgrep read it), its threads are named as Firecracker's, a
    PUT /vsock/vsock0 is a PUT /vsock, and --enable-pci puts the device on PCI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "firecracker").symlink_to(Path(sys.executable).parent / "altovirt-firecracker")
    log = tmp_path / "fc.log"
    fc = Firecracker(vms, tmp_path / "api.sock", "--enable-pci", "--log-path", str(log),
                     launcher=[str(bin_dir / "firecracker")])
    pid = fc.vm.proc.pid
    assert _thread_names(pid)[pid] == "firecracker"
    fc.ok("PUT", "/vsock/vsock0", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": "console=ttyS0 probe.run=snapshot"})
    fc.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: snap ready")
    names = _thread_names(pid)
    assert names.pop(pid) == "firecracker"
    assert {"fc_api", "fc_vcpu 0", "fc_vcpu 1"} <= set(names.values()), names
    assert "MainThread" not in names.values()
    config = fc.ok("GET", "/vm/config")
    assert isinstance(config, dict) and config["vsock"]["uds_path"] == str(tmp_path / "v.sock")
    fc.vm.type("quit")
    assert fc.vm.finish()[0] == 0
    text = log.read_text()
    assert "[anonymous-instance:main]" in text and "vsock: virtio device 19 at PCI 00:01.0" in text
