"""Kernel format detection and loading, the zero page and hvm_start_info, MP tables."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.acpi.tables import ResetRegister
from altovirt.arch.x86_64 import boot, layout, mptable
from altovirt.arch.x86_64 import bootparams as bp
from altovirt.arch.x86_64.loader import KernelError, detect, load_initrd, load_kernel
from altovirt.arch.x86_64.pvh import XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_start_info
from altovirt.devices.legacy.i8042 import I8042
from altovirt.memory import GuestMemory, GuestMemoryError

MiB = 1 << 20
NO_ACPI = boot.Firmware(None, I8042.reset_register)        # -machine acpi=off
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "altovirt-tests"


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_regions(128 * MiB))
    yield m
    m.close()


def nm(probe: Path, symbol: str) -> int:
    out = subprocess.run(["nm", str(probe / "probe.elf")], capture_output=True, text=True, check=True).stdout
    return next(int(ln.split()[0], 16) for ln in out.splitlines() if ln.split()[-1] == symbol)


@pytest.mark.parametrize("name, kind, entry_symbol", [
    ("probe.elf", "pvh", "pvh_start"),
    ("probe64.elf", "elf", "startup_elf64"),
    ("probe.bin", "raw", "_start"),
])
def test_probe_formats(probe: Path, mem: GuestMemory, name: str, kind: str, entry_symbol: str) -> None:
    image = (probe / name).read_bytes()
    k = load_kernel(mem, image)
    assert (k.kind, k.entry) == (kind, nm(probe, entry_symbol))
    # The image's first bytes sit at the 16 MiB load address.
    assert mem.read(layout.RAW_KERNEL_START, 64) == (probe / "probe.bin").read_bytes()[:64]


def test_probe_bzimage(probe: Path, mem: GuestMemory) -> None:
    image = (probe / "probe.bzImage").read_bytes()
    assert detect(image) == "bzimage"
    k = load_kernel(mem, image)
    assert (k.kind, k.entry) == ("bzimage", layout.HIMEM_START + 0x200)
    assert k.header.version == 0x020F and k.header.xloadflags & bp.XLF_KERNEL_64
    assert k.header.init_size >= len(image) - 1024
    assert mem.read(layout.HIMEM_START, 32) == image[1024:1056]


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """vmlinuz from Debian's linux-image-amd64, downloaded once and cached."""
    found = sorted(CACHE.glob("vmlinuz-*"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    deps = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                          capture_output=True, text=True).stdout
    pkg = next((ln.split()[1] for ln in deps.splitlines() if "Depends: linux-image-" in ln), None)
    if pkg is None:
        pytest.skip("SKIPPED LOUDLY: apt knows no linux-image-amd64 (run apt-get update); "
                    "the real-kernel header test cannot run")
    subprocess.run(["apt-get", "download", "-q", pkg], cwd=CACHE, check=True, capture_output=True)
    deb = next(CACHE.glob(f"{pkg}_*.deb"))
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "--strip-components=2", "--wildcards", "./boot/vmlinuz-*"],
                   input=tar, cwd=CACHE, check=True)
    deb.unlink()
    return sorted(CACHE.glob("vmlinuz-*"))[-1]


def test_debian_kernel_setup_header(debian_kernel: Path) -> None:
    image = debian_kernel.read_bytes()
    assert detect(image) == "bzimage"
    m = GuestMemory(layout.ram_regions(256 * MiB))
    try:
        k = load_kernel(m, image)
        hdr = k.header
        assert hdr.header == bp.HDRS_MAGIC and hdr.boot_flag == bp.BOOT_FLAG_MAGIC
        assert hdr.version >= 0x020F and hdr.xloadflags & bp.XLF_KERNEL_64
        assert hdr.relocatable_kernel == 1 and hdr.kernel_alignment == 0x200000
        assert hdr.cmdline_size == 2047 and hdr.initrd_addr_max == 0x7FFFFFFF
        assert hdr.init_size > len(image) and hdr.pref_address == 0x1000000
        setup = (hdr.setup_sects + 1) * 512
        # syssize covers the payload; signed images carry a short trailer after it.
        assert 0 <= len(image) - setup - hdr.syssize * 16 < 4096
        assert m.read(layout.HIMEM_START, 64) == image[setup:setup + 64]
        assert k.entry == layout.HIMEM_START + 0x200
        plan = boot.prepare(m, image, "console=ttyS0 quiet", b"initrd!", 1, NO_ACPI)
        params = bp.boot_params.from_buffer_copy(m.read(layout.ZERO_PAGE_START, 4096))
        assert params.hdr.type_of_loader == 0xFF and params.hdr.version == hdr.version
        assert params.hdr.ramdisk_image == plan.initrd_addr and params.hdr.ramdisk_size == 7
        # The header is copied only up to its own end (0x202 + image[0x201]).
        hdr_end = 0x202 + image[0x201]
        raw = bytes(params)[bp.SETUP_HEADER_OFFSET:hdr_end]
        changed = {"type_of_loader", "loadflags", "heap_end_ptr", "cmd_line_ptr", "ramdisk_image",
                   "ramdisk_size"}
        for name, *_ in bp.setup_header._fields_:
            off = getattr(bp.setup_header, name).offset
            if name not in changed and bp.SETUP_HEADER_OFFSET + off < hdr_end:
                size = getattr(bp.setup_header, name).size
                assert raw[off:off + size] == image[bp.SETUP_HEADER_OFFSET + off:][:size], name
    finally:
        m.close()


def test_zero_page_contents(probe: Path) -> None:
    m = GuestMemory(layout.ram_regions(5 << 30))     # RAM on both sides of the MMIO gap
    try:
        plan = boot.prepare(m, (probe / "probe.bin").read_bytes(), "a=b c", b"x" * 5000, 3, NO_ACPI)
        assert (plan.kind, plan.long_mode, plan.info_addr) == ("raw", True, layout.ZERO_PAGE_START)
        p = bp.boot_params.from_buffer_copy(m.read(layout.ZERO_PAGE_START, 4096))
        assert p.hdr.boot_flag == 0xAA55 and p.hdr.header == bp.HDRS_MAGIC and p.hdr.type_of_loader == 0xFF
        assert m.read(p.hdr.cmd_line_ptr, 6) == b"a=b c\0"
        assert p.hdr.ramdisk_size == 5000 and m.read(p.hdr.ramdisk_image, 5000) == b"x" * 5000
        assert p.hdr.ramdisk_image % 4096 == 0 and p.hdr.ramdisk_image + 5000 <= 0x80000000
        e820 = [(p.e820_table[i].addr, p.e820_table[i].size, p.e820_table[i].type)
                for i in range(p.e820_entries)]
        assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2),
                        (0x100000, (3 << 30) - 0x100000, 1), (3 << 30, 1 << 30, 2), (4 << 30, 2 << 30, 1)]
        # identity map of the first GiB
        assert struct.unpack("<Q", m.read(layout.PML4_START, 8))[0] == layout.PDPTE_START | 3
        assert struct.unpack("<Q", m.read(layout.PDE_START + 8 * 511, 8))[0] == (511 << 21) | 0x83
    finally:
        m.close()


def test_pvh_start_info(probe: Path, mem: GuestMemory) -> None:
    plan = boot.prepare(mem, (probe / "probe.elf").read_bytes(), "pvh!", b"abc", 1, NO_ACPI)
    assert (plan.kind, plan.long_mode, plan.info_addr) == ("pvh", False, layout.PVH_INFO_START)
    si = hvm_start_info.from_buffer_copy(mem.read(layout.PVH_INFO_START, ctypes.sizeof(hvm_start_info)))
    assert (si.magic, si.version, si.nr_modules) == (XEN_HVM_START_MAGIC_VALUE, 1, 1)
    assert mem.read(si.cmdline_paddr, 5) == b"pvh!\0"
    mod = struct.unpack("<QQ", mem.read(si.modlist_paddr, 16))
    assert mem.read(mod[0], mod[1]) == b"abc"
    size = ctypes.sizeof(hvm_memmap_table_entry)
    entries = [hvm_memmap_table_entry.from_buffer_copy(mem.read(si.memmap_paddr + i * size, size))
               for i in range(si.memmap_entries)]
    assert [(e.addr, e.size, e.type) for e in entries] == layout.e820_map(mem.regions)


@pytest.mark.parametrize("image, message", [
    (b"", "kernel image is empty"),
    (b"\x7fELF\x01\x01\x01" + bytes(60), "not a little-endian x86_64 ELF64"),
    (b"\x7fELF", "ELF image is truncated"),
    (bytes(56) + b"ARMd" + bytes(8), "the kernel is an arm64 Image; an x86_64 host boots x86_64 kernels"),
])
def test_bad_images(mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(KernelError, match=message):
        load_kernel(mem, image)


def patched_bzimage(probe: Path, offset: int, fmt: str, value: int) -> bytes:
    image = bytearray((probe / "probe.bzImage").read_bytes())
    struct.pack_into(fmt, image, offset, value)
    return bytes(image)


def test_old_bzimage_protocol(probe: Path, mem: GuestMemory) -> None:
    with pytest.raises(KernelError, match=r"boot protocol 2\.11 has no 64-bit entry point"):
        load_kernel(mem, patched_bzimage(probe, 0x206, "<H", 0x020B))


def test_bzimage_without_64bit_entry(probe: Path, mem: GuestMemory) -> None:
    with pytest.raises(KernelError, match="XLF_KERNEL_64"):
        load_kernel(mem, patched_bzimage(probe, 0x236, "<H", 0))


def test_kernel_larger_than_ram(probe: Path, mem: GuestMemory) -> None:
    with pytest.raises(KernelError, match=r"needs 209715200 bytes .*\(init_size\), more than guest RAM"):
        load_kernel(mem, patched_bzimage(probe, 0x260, "<I", 200 * MiB))


def test_initrd_must_fit(probe: Path, mem: GuestMemory) -> None:
    k = load_kernel(mem, (probe / "probe.bin").read_bytes())
    with pytest.raises(KernelError, match="give the VM more memory"):
        load_initrd(mem, k, bytes(120 * MiB))


def test_command_line_limit(probe: Path, mem: GuestMemory) -> None:
    with pytest.raises(KernelError, match="command line is 2048 bytes with what the machine adds to "
                                          "-append; this kernel accepts at most 2047"):
        boot.prepare(mem, (probe / "probe.bzImage").read_bytes(), "x" * 2048, None, 1, NO_ACPI)


def test_reset_vector_pulses_the_i8042_reset_line(probe: Path, mem: GuestMemory) -> None:
    """F000:FFF0 holds mov al, 0xfe; out 0x64, al; hlt; jmp $-1: what the i8042 hands boot.py."""
    boot.prepare(mem, (probe / "probe.elf").read_bytes(), "", None, 1, NO_ACPI)
    assert mem.read(layout.RESET_VECTOR, 7) == bytes([0xB0, 0xFE, 0xE6, 0x64, 0xF4, 0xEB, 0xFD])
    with pytest.raises(ValueError, match="ports 0-0xff"):
        boot.reset_stub(ResetRegister(0x602, 0x0F))     # out imm8 cannot name the ACPI reset port


def test_guest_memory_bounds() -> None:
    m = GuestMemory(layout.ram_regions(4 << 30))
    try:
        assert [(r.gpa, r.size) for r in m.regions] == [(0, 3 << 30), (4 << 30, 1 << 30)]
        m.write((4 << 30) + 10, b"hi")
        assert m.read((4 << 30) + 10, 2) == b"hi"
        for gpa, n in [((3 << 30) - 1, 2), (3 << 30, 1), (5 << 30, 1), (-1, 1), (0, -1)]:
            with pytest.raises(GuestMemoryError):
                m.view(gpa, n)
    finally:
        m.close()


def _mp_sum(data: bytes) -> int:
    return sum(data) & 0xFF


@pytest.mark.parametrize("cpus", [1, 2, 254])
def test_mptable(cpus: int) -> None:
    mpf, table = mptable.build(cpus)
    assert mpf[:4] == b"_MP_" and _mp_sum(mpf) == 0 and len(mpf) == 16
    assert struct.unpack_from("<I", mpf, 4)[0] == mptable.MPC_ADDR
    assert table[:4] == b"PCMP" and _mp_sum(table) == 0
    length, rev, _, _, _, _, _, count, lapic = struct.unpack_from("<HBB8s12sIHHI", table, 4)
    assert (length, rev, lapic) == (len(table), 4, layout.APIC_ADDR)
    assert count == cpus + 1 + 1 + 24 + 2
    procs = [table[44 + 20 * i:64 + 20 * i] for i in range(cpus)]
    assert [p[1] for p in procs] == list(range(cpus))
    assert [p[3] for p in procs] == [3] + [1] * (cpus - 1)       # enabled, BSP first
    ioapic = table[44 + 20 * cpus + 8:][:8]
    assert (ioapic[0], ioapic[1]) == (2, cpus)
    assert struct.unpack_from("<I", ioapic, 4)[0] == layout.IOAPIC_ADDR
    assert mptable.MPC_ADDR + len(table) <= 0x100000
