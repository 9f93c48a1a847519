"""The probe's vsock, hot-plug and XenStore tests (tests/test_vsock.py, test_hotplug.py,
test_xenstore.py) under AltoVirt on arm64, with the arm64 probe the host built: the same
assertions, through the PL011 and the GIC's SPIs instead of COM1 and the IOAPIC."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import GUEST, vms
from ..test_hotplug import disks, test_disk_plugged_used_and_unplugged
from ..test_vsock import test_streams_both_ways
from ..test_xenstore import test_guest_over_vsock

__all__ = ["disks", "test_disk_plugged_used_and_unplugged", "test_guest_over_vsock", "test_streams_both_ways",
           "vms"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def probe() -> Path:
    """guest/, as the host built it (this level has no compiler)."""
    assert (GUEST / "probe-arm64.Image").exists(), "the host builds guest/probe-arm64.Image first"
    return GUEST
