"""A private network namespace with taps, each answered by the raw-Ethernet echo
responder (net_echo.py), for tests that put a VM on a tap."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import KVM_PROBLEM, ROOT

ECHO = Path(__file__).with_name("net_echo.py")


def _netns_problem() -> str | None:
    if KVM_PROBLEM:
        return KVM_PROBLEM
    if shutil.which("ip") is None:
        return "SKIPPED LOUDLY: iproute2 'ip' is missing; the tap tests cannot build their network"
    if os.geteuid() != 0:
        return "SKIPPED LOUDLY: network namespaces and taps need root"
    return None


needs_netns = pytest.mark.skipif(_netns_problem() is not None, reason=_netns_problem() or "")


class NetNs:
    """A private network namespace with taps and the echo responder on each."""

    def __init__(self, taps: tuple[str, ...], owner: int | None = None) -> None:
        """``owner``: a uid that may attach the taps without CAP_NET_ADMIN."""
        self.name = f"altovirt-test-{os.getpid()}"
        self.path = f"/run/netns/{self.name}"
        self.echoes: list[subprocess.Popen[str]] = []
        self.ip("netns", "add", self.name)
        for t in taps:
            self.ip("-n", self.name, "tuntap", "add", "dev", t, "mode", "tap",
                    *(["user", str(owner)] if owner is not None else []))
            # MTU 9000: the responder's 4000-byte answer to "big" must fit the link
            self.ip("-n", self.name, "link", "set", t, "mtu", "9000", "up")
            echo = subprocess.Popen(self.cmd(sys.executable, str(ECHO), t), stdout=subprocess.PIPE, text=True)
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            self.echoes.append(echo)

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              stdin=subprocess.DEVNULL)

    def close(self) -> None:
        for e in self.echoes:
            e.kill()
            e.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
