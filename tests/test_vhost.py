"""vhost-net (``-netdev ...,vhost=on``): its request numbers against the kernel's headers, and
what a user sees on a host without /dev/vhost-net. Linux drives the NIC itself in the test bed
(tests/linux/test_devices.py), where the module is loaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.backends import vhost

from .cabi import c_values, needs_gcc
from .conftest import ProbeReport, altovirt_cmd
from .netns import NetNs, needs_netns

REQUESTS = ("VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_SET_MEM_TABLE",
            "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE", "VHOST_GET_VRING_BASE",
            "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_NET_SET_BACKEND",
            "VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING")


@needs_gcc
def test_request_numbers_and_layouts_match_linux_headers() -> None:
    sizes = ("sizeof(struct vhost_vring_state)", "sizeof(struct vhost_vring_file)",
             "sizeof(struct vhost_vring_addr)", "sizeof(struct vhost_memory)",
             "sizeof(struct vhost_memory_region)")
    got = c_values(("linux/vhost.h",), REQUESTS + sizes)
    assert {n: got[n] for n in REQUESTS} == {n: getattr(vhost, n) for n in REQUESTS}
    assert [got[s] for s in sizes] == [s.size for s in (vhost._VRING_STATE, vhost._VRING_FILE,
                                                        vhost._VRING_ADDR, vhost._MEMORY,
                                                        vhost._MEMORY_REGION)]


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs(("tap0",))
    yield ns
    ns.close()


@needs_netns
@pytest.mark.skipif(os.path.exists(vhost.DEVICE), reason="this host has /dev/vhost-net; "
                    "test_probe_frames_through_vhost runs instead")
def test_without_vhost_net_one_line_and_the_tap_let_go(probe: Path, netns: NetNs) -> None:
    kernel = ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=net", "-serial", "stdio"]
    p = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0,vhost=on"))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("altovirt: error: -netdev id=n0: /dev/vhost-net: No such file or directory "
                        "(load the vhost_net module)\n")
    bad = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0,vhost=maybe"))
    assert bad.returncode == 2 and bad.stderr.startswith("altovirt: error: -netdev vhost: ")
    p = netns.run(altovirt_cmd(*kernel, "-netdev", "id=n0,netdev=tap0"))    # the tap is free again
    assert ProbeReport.parse(p.stdout).tests == {"net": "ok"}, p.stderr


@needs_netns
@pytest.mark.skipif(not os.path.exists(vhost.DEVICE), reason="SKIPPED LOUDLY: no /dev/vhost-net on "
                    "this host (modprobe vhost_net); the Linux test bed still drives a vhost-net NIC")
def test_probe_frames_through_vhost(probe: Path, netns: NetNs) -> None:
    p = netns.run(altovirt_cmd("-kernel", str(probe / "probe.elf"), "-netdev", "id=n0,netdev=tap0,vhost=on",
                               "-append", "probe.run=net,net-big", "-serial", "stdio"))
    assert ProbeReport.parse(p.stdout).tests == {"net": "ok", "net-big": "ok"}, p.stderr
