"""Every operation of Firecracker's OpenAPI description (tests/data), fuzzed with schemathesis
against altovirt-firecracker, before and after the VM starts: every answer is a 2xx, or a 4xx
with a fault_message, and the VMM (jailed, so that the paths it is sent stay in its jail)
serves and runs its VM to the end."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from requests_unixsocket.adapters import UnixHTTPConnectionPool
from schemathesis.core.result import Err

from .conftest import KVM_PROBLEM, Vm
from .fcapi import Firecracker

pytestmark = pytest.mark.skipif(
    KVM_PROBLEM is not None or os.geteuid() != 0,
    reason=KVM_PROBLEM or "SKIPPED LOUDLY: the fuzzed VMM runs jailed, which needs root")

SPEC = Path(__file__).with_name("data") / "firecracker-api-1.16.1.json"
JAILER = str(Path(sys.executable).parent / "altovirt-jailer")
VMM = str(Path(sys.executable).parent / "altovirt-firecracker")
EXAMPLES = 30                       # per operation and phase
UID = 4242                          # the jailed VMM's user and group


class UnixAdapter(requests.adapters.HTTPAdapter):
    """Sends every request of a requests session to one unix socket, whatever its URL's host."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._pool = UnixHTTPConnectionPool("http+unix://" + urllib.parse.quote(path, safe=""), 10)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> Any:
        return self._pool

    def request_url(self, request: Any, proxies: Any) -> str:
        return str(request.path_url)


class Jail:
    """A Firecracker-style jail (the probe kernel and a disk linked in) and the VMMs run in it
    by the jailer, one after the other."""

    def __init__(self, probe: Path, vms: list[Vm]) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))    # short: socket paths must fit
        self.root = self.base / "altovirt-firecracker" / "fuzz" / "root"
        self.root.mkdir(parents=True)
        shutil.copy(probe / "probe.elf", self.root / "vmlinux")
        (self.root / "disk").write_bytes(bytes(1 << 20))
        os.chown(self.root / "disk", UID, UID)         # the tool's part: the VM's user writes its disk
        self.args = ["--id", "fuzz", "--exec-file", VMM, "--chroot-base-dir", str(self.base)]
        self.vms = vms

    def start(self) -> Firecracker:
        sock = self.root / "run" / "api.sock"
        sock.unlink(missing_ok=True)
        vm = Vm(*self.args, "--uid", str(UID), "--gid", str(UID), "--", "--api-sock", "/run/api.sock",
                launcher=[JAILER])
        self.vms.append(vm)
        vm.wait_for_path(sock)
        return Firecracker.attach(vm, sock)

    def clean(self) -> None:
        for vm in self.vms:
            if vm.proc.poll() is None:
                vm.proc.kill()
                vm.proc.wait()
        subprocess.run([JAILER, *self.args, "--clean"], check=True, capture_output=True)
        shutil.rmtree(self.base)


@pytest.fixture
def jail(probe: Path, vms: list[Vm]) -> Iterator[Jail]:
    j = Jail(probe, vms)
    try:
        yield j
    finally:
        j.clean()


def fuzz(sock: Path, skip: set[str]) -> collections.Counter[int]:
    """Send EXAMPLES generated requests per operation (but those in ``skip``); the statuses seen."""
    schema = schemathesis.openapi.from_path(str(SPEC))
    session = requests.Session()
    session.mount("http://", UnixAdapter(str(sock)))
    seen: collections.Counter[int] = collections.Counter()
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()          # the description itself did not load
        op = result.ok()
        if op.definition.raw.get("operationId") in skip:
            continue

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                             phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=op.as_strategy())
        def one(case: Any) -> None:
            response = case.call(session=session, base_url="http://localhost")
            seen[response.status_code] += 1
            where = f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                body = json.loads(response.text)
                assert set(body) == {"fault_message"} and body["fault_message"], where
        one()
    return seen


def test_every_operation_fuzzed(jail: Jail) -> None:
    # Before the start, what would start or load a VM left out: the VMM stays to be configured.
    fc = jail.start()
    before = fuzz(fc.sock, {"createSyncAction", "loadSnapshot"})
    fc.close()
    assert fc.state() == "Not started"
    fc.vm.proc.terminate()
    assert fc.vm.finish()[0] == 128 + 15
    # After the start, in a VMM configured afresh: everything.
    fc = jail.start()
    fc.ok("PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "boot_args": "probe.run=snapshot"})
    fc.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    fc.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/disk", "is_root_device": True,
                                    "is_read_only": False})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: snap ready")
    after = fuzz(fc.sock, set())
    fc.close()
    assert fc.state() in ("Running", "Paused")
    if fc.state() == "Paused":
        fc.ok("PATCH", "/vm", {"state": "Resumed"})
    fc.vm.type("count")
    fc.vm.wait_line("probe: snap count=")
    fc.vm.type("quit")
    assert fc.vm.finish()[0] == 0
    print("statuses before the start:", dict(before), "after:", dict(after))
    assert before[400] > 0 and after[400] > 0 and before[204] + after[204] > 0
