"""The arm64 test bed's guest assets, built on the host: Debian's arm64 kernel and the busybox
initramfs with arm64 modules and cross-compiled programs (tests/testbed/initramfs.py). The bed
itself is checked from inside its L1 by tests/linux_arm64/test_bed.py, which tests/test_linux.py
runs there."""

from __future__ import annotations

from .linux_arm64.assets import check_guest_assets, members
from .testbed import arch, cpio, debian, initramfs


def test_arm64_guest_assets_build() -> None:
    k = debian.kernel(arch.AARCH64)
    assert k.arch == "aarch64" and k.release.endswith("-arm64")
    check_guest_assets(k.vmlinuz, initramfs.build(k), k.release)


def test_cpio_reader_matches_the_writer() -> None:
    """members reads what cpio.archive writes (both here and in L1 it is what the checks use)."""
    data = cpio.archive({"a/b": cpio.file(b"xyz", 0o755), "l": cpio.symlink("/a/b")})
    got = members(data)
    assert got["a/b"] == (cpio.FILE | 0o755, b"xyz") and got["l"][1] == b"/a/b" and "a" in got
