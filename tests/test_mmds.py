"""MMDS (Firecracker's metadata service): its store and HTTP answers by Firecracker's rules,
its network stack behind a tap talking to Linux's own TCP and to curl, and its API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.mmds import http
from altovirt.mmds.store import LimitExceeded, Mmds, NotFound, NotInitialized, Unsupported, merge_patch

from .conftest import ROOT, Vm
from .fcapi import Firecracker
from .netns import NetNs, needs_netns

DOC = {"latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-fea54097",
                                "local-hostname": "ip-10-251-50-12.ec2.internal",
                                "public-keys": {"0": {"openssh-key": "ssh-rsa AAAA"}}},
                  "user-data": "#!/bin/sh\necho hi\n"},
       "list": [1, "two"], "number": 7}


@pytest.fixture
def store() -> Mmds:
    s = Mmds()
    s.put(DOC)
    return s


@pytest.mark.parametrize(("path", "as_json", "text"), [
    ("/latest/meta-data/ami-id", False, "ami-12345678"),
    ("/latest/meta-data/ami-id", True, '"ami-12345678"'),
    ("/latest/meta-data", False, "ami-id\nlocal-hostname\npublic-keys/\nreservation-id"),
    ("/latest/meta-data/", False, "ami-id\nlocal-hostname\npublic-keys/\nreservation-id"),
    ("/latest/meta-data/public-keys/0/openssh-key", False, "ssh-rsa AAAA"),
    ("/latest/meta-data/public-keys", True, '{"0":{"openssh-key":"ssh-rsa AAAA"}}'),
    ("/list/1", True, '"two"'),
    ("", False, "latest/\nlist\nnumber"),
    ("/", False, "latest/\nlist\nnumber"),
])
def test_paths_as_imds_and_json(store: Mmds, path: str, as_json: bool, text: str) -> None:
    assert store.get(path, as_json) == text


@pytest.mark.parametrize(("path", "error"), [
    ("/latest/nothing", NotFound), ("/list/2", NotFound), ("/list/01", NotFound), ("nope", NotFound),
    ("/number", Unsupported), ("/list", Unsupported),
])
def test_paths_that_fail(store: Mmds, path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        store.get(path, False)


def test_put_patch_and_the_limit() -> None:
    s = Mmds(limit=64)
    with pytest.raises(NotInitialized):
        s.patch({"a": 1})
    s.put({"a": {"b": 1, "c": 2}})
    s.patch({"a": {"b": None, "d": [1]}, "e": "f"})      # RFC 7396: null removes
    assert s.value() == {"a": {"c": 2, "d": [1]}, "e": "f"}
    with pytest.raises(LimitExceeded):
        s.patch({"big": "x" * 64})
    with pytest.raises(LimitExceeded):
        s.put("x" * 64)
    assert s.value() == {"a": {"c": 2, "d": [1]}, "e": "f"}      # a refused change changes nothing
    assert merge_patch({"a": 1}, ["replaced"]) == ["replaced"]


def _ask(s: Mmds, head: str) -> tuple[int, dict[str, str], str]:
    raw = http.respond(s, head.replace("\n", "\r\n").encode())
    top, _, body = raw.decode().partition("\r\n\r\n")
    status_line, *lines = top.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body.encode())
    return int(status_line.split()[1]), headers, body


def test_v1_and_v2_over_http(store: Mmds) -> None:
    assert _ask(store, "GET /latest/meta-data/ami-id HTTP/1.1\n\n")[::2] == (200, "ami-12345678")
    assert _ask(store, "GET //latest//meta-data/ami-id HTTP/1.1\n\n")[::2] == (200, "ami-12345678")
    status, headers, body = _ask(store, "GET /latest HTTP/1.1\nAccept: application/json\n\n")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == DOC["latest"]
    assert _ask(store, "GET /nope HTTP/1.1\n\n")[::2] == (404, "Resource not found: /nope.")
    assert _ask(store, "GET /number HTTP/1.1\n\n")[0] == 501
    store.version = "V2"
    assert _ask(store, "GET /latest HTTP/1.1\n\n")[0] == 401
    assert _ask(store, "GET /latest HTTP/1.1\nX-metadata-token: bogus\n\n")[::2] == \
        (401, "MMDS token not valid.")
    assert "time to live value not found" in _ask(store, "PUT /latest/api/token HTTP/1.1\n\n")[2]
    assert _ask(store, "PUT /latest/api/token HTTP/1.1\nX-metadata-token-ttl-seconds: 0\n\n")[0] == 400
    assert _ask(store, "PUT /latest/api/token HTTP/1.1\nX-metadata-token-ttl-seconds: 21601\n\n")[0] == 400
    assert _ask(store, "PUT /latest/api/token HTTP/1.1\nX-metadata-token-ttl-seconds: -5\n\n")[0] == 400
    assert _ask(store, "PUT /latest/api/token HTTP/1.1\nX-Forwarded-For: 1.2.3.4\n"
                       "X-metadata-token-ttl-seconds: 60\n\n")[0] == 400
    status, headers, token = _ask(store, "PUT /latest/api/token HTTP/1.1\n"
                                         "X-aws-ec2-metadata-token-ttl-seconds: 60\n\n")
    assert status == 200 and headers["x-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert _ask(store, f"GET /latest/meta-data/ami-id HTTP/1.1\nX-metadata-token: {token}\n\n")[::2] == \
        (200, "ami-12345678")
    assert Mmds().tokens.is_valid(token) is False                   # another VMM's key
    assert _ask(store, f"GET /latest HTTP/1.1\nX-metadata-token: {token[:-2]}AA\n\n")[0] == 401
    assert _ask(store, "PATCH /latest HTTP/1.1\n\n")[0] == 405
    assert _ask(store, "DELETE /latest HTTP/1.1\n\n")[0] == 501
    assert _ask(store, "GET /latest HTTP/9.9\n\n")[0] == 501
    assert _ask(store, "garbage\n\n")[0] == 400
    assert _ask(store, "GET /latest HTTP/1.1\nno colon here\n\n")[0] == 400
    assert _ask(store, "GET /latest HTTP/1.1\nContent-Length: 5\n\n")[0] == 400


@pytest.fixture
def mmds_behind_a_tap() -> Iterator[NetNs]:
    """A namespace whose kernel reaches MMDS through tap mm0 (tests/mmds_tap.py)."""
    net = NetNs(())
    settings = json.dumps({"version": "V2", "data": DOC})
    proc = subprocess.Popen(net.cmd(sys.executable, str(ROOT / "tests" / "mmds_tap.py"), settings),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield net
    finally:
        proc.kill()
        proc.wait()
        net.close()


@needs_netns
@pytest.mark.skipif(shutil.which("curl") is None, reason="SKIPPED LOUDLY: curl (Debian's curl) is missing")
def test_curl_through_linux_tcp(mmds_behind_a_tap: NetNs) -> None:
    """Linux's ARP and TCP and curl reach the stack as a guest's would: V2's token, then
    reads, several on one connection, and a read too large for one segment."""
    net = mmds_behind_a_tap
    base = "http://169.254.169.254"
    token = net.run(["curl", "-sS", "--max-time", "10", "-X", "PUT", f"{base}/latest/api/token",
                     "-H", "X-metadata-token-ttl-seconds: 60"])
    assert token.returncode == 0, token.stderr
    got = net.run(["curl", "-sS", "--max-time", "10", "-H", f"X-metadata-token: {token.stdout}",
                   f"{base}/latest/meta-data/ami-id", f"{base}/latest/meta-data/local-hostname"])
    assert (got.returncode, got.stdout) == (0, "ami-12345678ip-10-251-50-12.ec2.internal"), got.stderr
    refused = net.run(["curl", "-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                       f"{base}/latest/meta-data/ami-id"])
    assert refused.stdout == "401"
    whole = net.run(["curl", "-sS", "--max-time", "10", "-H", f"X-metadata-token: {token.stdout}",
                     "-H", "Accept: application/json", f"{base}/"])
    assert json.loads(whole.stdout) == DOC
    # Another port, or malformed HTTP: answered or refused, and the stack serves on.
    other = net.run(["curl", "-s", "--max-time", "5", "http://169.254.169.254:8080/"])
    assert other.returncode == 7                                     # refused: a reset
    bad = net.run([sys.executable, "-c",
                   "import socket; s = socket.create_connection(('169.254.169.254', 80), 10); "
                   "s.sendall(b'\\x00\\xff garbage\\r\\n\\r\\n' + b'A' * 3000); print(s.recv(100)[:12])"])
    assert "HTTP/1.1 400" in bad.stdout or bad.returncode != 0, bad.stderr
    again = net.run(["curl", "-sS", "--max-time", "10", "-H", f"X-metadata-token: {token.stdout}",
                     f"{base}/latest/user-data"])
    assert again.stdout == DOC["latest"]["user-data"]                # type: ignore[index]


@needs_netns
def test_mmds_through_the_api(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """PUT /mmds/config, PUT, PATCH and GET /mmds before and after the start, the limit's 413,
    --metadata, and GET /vm/config; what MMDS lacks a NIC for is refused."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"from": "file"}))
    net = NetNs(("tap0",))
    try:
        fc = Firecracker(vms, tmp_path / "api.sock", "--metadata", str(meta), "--mmds-size-limit", "200",
                         prefix=tuple(net.cmd()))
        assert fc.ok("GET", "/mmds") == {"from": "file"}
        assert "does not correspond to any existing network interface" in fc.fault(
            "PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
        fc.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
        assert "not link local" in fc.fault("PUT", "/mmds/config", {"network_interfaces": ["eth0"],
                                                                     "ipv4_address": "10.0.0.1"})
        assert "is empty" in fc.fault("PUT", "/mmds/config", {"network_interfaces": []})
        fc.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2",
                                      "ipv4_address": "169.254.170.2"})
        fc.ok("PATCH", "/mmds", {"added": [1, 2]})
        status, reply = fc.call("PUT", "/mmds", {"big": "x" * 300})
        assert status == 413 and reply == {
            "fault_message": "MMDS limit exceeded error: The MMDS patch request doesn't fit."}
        fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                      "boot_args": "console=ttyS0 probe.run=snapshot"})
        fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        fc.vm.wait_line("probe: snap ready")
        assert fc.ok("GET", "/mmds") == {"from": "file", "added": [1, 2]}
        fc.ok("PATCH", "/mmds", {"from": None, "after": "start"})
        assert fc.ok("GET", "/mmds") == {"added": [1, 2], "after": "start"}
        assert fc.call("PATCH", "/mmds", {"big": "x" * 300})[0] == 413
        assert "not supported after starting" in fc.fault("PUT", "/mmds/config",
                                                          {"network_interfaces": ["eth0"]})
        config = fc.ok("GET", "/vm/config")
        assert isinstance(config, dict) and config["mmds-config"] == {
            "version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2",
            "imds_compat": False}
        fc.vm.type("quit")
        assert fc.vm.finish()[0] == 0
    finally:
        net.close()


@needs_netns
@pytest.mark.skipif(shutil.which("xenstore-read") is None,
                    reason="SKIPPED LOUDLY: Debian xenstore-utils is missing (scripts/setup installs it)")
def test_the_document_in_the_xenstore(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """With --xenstore, the document is under the guest's home in the XenStore, read-only to the
    guest, and Debian's xenstore tools read it and watch a PATCH arrive."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({**DOC, "odd key.v1": True}))
    xs = tmp_path / "xs.sock"
    net = NetNs(("tap0",))
    try:
        fc = Firecracker(vms, tmp_path / "api.sock", "--metadata", str(meta), "--xenstore", str(xs),
                         prefix=tuple(net.cmd()))
        fc.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
        fc.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
        fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                      "boot_args": "console=ttyS0 probe.run=snapshot"})
        fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        fc.vm.wait_line("probe: snap ready")
        env = {**os.environ, "XENSTORED_PATH": str(xs)}

        def tool(*args: str) -> str:
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            return done.stdout

        home = "/local/domain/1/mmds"
        assert tool("xenstore-read", f"{home}/latest/meta-data/ami-id",
                    f"{home}/latest/meta-data/public-keys/0/openssh-key", f"{home}/list/1", f"{home}/number",
                    f"{home}/odd_20key_2ev1") == "ami-12345678\nssh-rsa AAAA\ntwo\n7\ntrue\n"
        assert "(n0,r1)" in tool("xenstore-ls", "-p", "/local/domain/1")
        watcher = subprocess.Popen(["xenstore-watch", "-n", "2", f"{home}/latest/meta-data/ami-id"], env=env,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert watcher.stdout is not None
            assert watcher.stdout.readline().startswith(f"{home}/latest/meta-data/ami-id")   # set
            fc.ok("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-new"}}})
            assert watcher.stdout.readline().startswith(f"{home}/latest/meta-data/ami-id")   # changed
            assert watcher.wait(timeout=10) == 0
        finally:
            watcher.kill()
        assert tool("xenstore-read", f"{home}/latest/meta-data/ami-id") == "ami-new\n"
        fc.vm.type("quit")
        assert fc.vm.finish()[0] == 0
    finally:
        net.close()
