"""MMDS from Debian's kernel, through altovirt-firecracker's API: the guest's busybox nc
reaches the metadata service over its NIC (Linux's ARP and TCP), V1 and V2 (one boot each),
sees a PATCH made while it runs, and bad input (bad tokens, an oversized document, malformed
HTTP, another port, more connections than MMDS keeps) is answered or dropped with the VMM
serving on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, curl, firecracker_guest, start_firecracker_guest

BOOT_TIMEOUT = 400
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("curl") is None,
                                 reason="SKIPPED LOUDLY: curl (Debian's curl) is missing")]
MMDS = "169.254.169.254"
DOC = {"latest": {"meta-data": {"ami-id": "ami-12345678", "hostname": "debian-guest"}}}


def boot(kernel: debian.Kernel, initrd: Path, d: Path, version: str) -> tuple[guest.LinuxGuest, Netns, Path]:
    """A guest on tap0 whose MMDS (``version``, at most 1 KiB) holds DOC, from --metadata; its
    route to MMDS."""
    (d / "meta.json").write_text(json.dumps(DOC))
    ns = Netns("tap0")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    try:
        g, sock = firecracker_guest(d, "--metadata", str(d / "meta.json"), "--mmds-size-limit", "1024",
                                    prefix=ns.prefix)
        start_firecracker_guest(g, sock, kernel, initrd,
                                ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
                                ("/mmds/config", {"network_interfaces": ["eth0"], "version": version}),
                                append=f"guest.ip={GUEST_IP}/{PREFIX}", vcpus=1, mem_mib=128,
                                timeout=BOOT_TIMEOUT)
        g.check(f"ip route add {MMDS} dev eth0")
    except BaseException:
        ns.close()
        raise
    return g, ns, sock


def nc(g: guest.LinuxGuest, request: str, port: int = 80) -> str:
    """What MMDS answers ``request`` (its lines joined with CRLF) on one connection, sent with
    busybox nc (busybox-static's wget crashes in getaddrinfo, even for an address)."""
    text = request.replace("\n", "\\r\\n")
    return g.check(f"printf '{text}' | nc -w 2 {MMDS} {port}; true", timeout=60).replace("\r\n", "\n")


def get(g: guest.LinuxGuest, path: str, *headers: str) -> tuple[int, str]:
    """The status and body of a GET from the guest."""
    answer = nc(g, f"GET {path} HTTP/1.1\n" + "".join(f"{h}\n" for h in headers) + "\n")
    head, _, body = answer.partition("\n\n")
    assert head.startswith("HTTP/1.1 "), answer
    return int(head.split()[1]), body.strip("\n")


def test_v1_from_debian(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    g, ns, sock = boot(kernel, initrd, tmp_path, "V1")
    try:
        assert get(g, "/latest/meta-data/ami-id") == (200, "ami-12345678")
        assert get(g, "/latest/meta-data/") == (200, "ami-id\nhostname")
        status, text = get(g, "/latest", "Accept: application/json")
        assert status == 200 and json.loads(text) == DOC["latest"]
        # A PATCH while the guest runs: its next read sees it.
        curl(sock, "PATCH", "/mmds", {"latest": {"meta-data": {"hostname": "renamed"}}})
        assert get(g, "/latest/meta-data/hostname") == (200, "renamed")
        assert get(g, "/nothing/here")[0] == 404
        assert g.poweroff(120) == 0
    finally:
        g.close()
        ns.close()


def test_v2_and_bad_input_from_debian(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    g, ns, sock = boot(kernel, initrd, tmp_path, "V2")
    try:
        answer = nc(g, "PUT /latest/api/token HTTP/1.1\nX-metadata-token-ttl-seconds: 60\n\n")
        assert answer.startswith("HTTP/1.1 200"), answer
        token = answer.split("\n\n", 1)[1].strip()
        assert get(g, "/latest/meta-data/ami-id", f"X-metadata-token: {token}") == (200, "ami-12345678")
        assert get(g, "/latest/meta-data/ami-id")[0] == 401               # V2: no token
        assert get(g, "/latest/meta-data/ami-id", "X-metadata-token: forged") == \
            (401, "MMDS token not valid.")
        # Malformed HTTP, another port, a head past MMDS's buffer, more connections than it keeps.
        assert nc(g, "BREW /pot HTCPCP/1.0\n\n").startswith("HTTP/1.1 501")
        assert nc(g, "garbage\n\n").startswith("HTTP/1.1 400")
        g.check(f"nc -w 2 {MMDS} 81 </dev/null; true")
        g.check(f"head -c 5000 /dev/zero | nc -w 2 {MMDS} 80 >/dev/null; true", timeout=60)
        g.check(f"for i in $(seq 40); do (sleep 3 | nc -w 3 {MMDS} 80 >/dev/null &) ; done; sleep 4",
                timeout=120)
        # An oversized document is refused on the host; the guest reads the one before.
        assert curl_status(sock, "PUT", "/mmds", {"big": "x" * 2000}) == "413"
        curl(sock, "PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-patched"}}})
        assert get(g, "/latest/meta-data/ami-id", f"X-metadata-token: {token}") == (200, "ami-patched")
        assert g.poweroff(120) == 0
    finally:
        g.close()
        ns.close()


def curl_status(sock: Path, method: str, path: str, body: object) -> str:
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                           "--unix-socket", str(sock), "--data", json.dumps(body), f"http://localhost{path}"],
                          capture_output=True, text=True, timeout=120)
    return done.stdout
