"""What the arm64 guest's assets must be, checked on the host (tests/test_testbed_arm64.py) and
in the arm64 test bed's L1 (tests/linux_arm64/test_bed.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

from ..testbed import arch, debian, initramfs

EM_AARCH64 = 183                # ELF e_machine


def members(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a newc cpio archive."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        header = archive[pos:pos + 110]
        assert header[:6] == b"070701", f"no newc header at {pos}"
        mode, size, namesize = (int(header[6 + 8 * i:14 + 8 * i], 16) for i in (1, 6, 11))
        name = archive[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, archive[pos:pos + size])
        pos = (pos + size + 3) & ~3


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(data[18:20], "little")


def check_guest_assets(kernel: Path, initrd: Path, release: str) -> None:
    """The arm64 guest's kernel is an arm64 Image and its initramfs holds arm64 programs and
    the modules of arch.AARCH64.guest_modules (or their being built in)."""
    head = kernel.read_bytes()[:64]
    assert head[0x38:0x3c] == b"ARMd", "the kernel is not an arm64 Image"
    files = members(gzip.decompress(initrd.read_bytes()))
    for program in ("bin/busybox", *(f"bin/{p.stem}" for p in initramfs.GUEST_SRC.glob("*.c"))):
        assert elf_machine(files[program][1]) == EM_AARCH64, program
    assert files["bin/sh"][1] == b"/bin/busybox" and files["init"][1].startswith(b"#!/bin/busybox sh")
    mods = {debian.module_name(n) for n in files if n.startswith(f"lib/modules/{release}/") and ".ko" in n}
    builtin = files[f"lib/modules/{release}/modules.builtin"][1].decode()
    for name in arch.AARCH64.guest_modules:
        assert name in mods or f"/{name}.ko" in builtin.replace("-", "_"), name
    listed = files["etc/guest/modules"][1].decode().split()
    assert listed == list(arch.AARCH64.guest_modules)
