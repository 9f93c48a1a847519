"""Kernel image loading: bzImage, ELF vmlinux, PVH ELF and raw binary.

The format is detected from the file's content, never from its name:
  * ``\\x7fELF`` with a XEN_ELFNOTE_PHYS32_ENTRY note  -> PVH (32-bit entry)
  * ``\\x7fELF`` otherwise                             -> 64-bit entry at e_entry
  * ``HdrS`` at 0x202 and 0xAA55 at 0x1FE             -> bzImage, 64-bit entry at load+0x200
  * anything else                                     -> raw binary at 16 MiB
"""

from __future__ import annotations

import ctypes as C
import struct
from dataclasses import dataclass

from ...errors import AltoVirtError
from ...memory import GuestMemory, GuestMemoryError
from . import bootparams as bp
from . import layout
from .pvh import XEN_ELFNOTE_PHYS32_ENTRY

# ELF (elf.h)
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")

# Boot protocol 2.12 added xloadflags (XLF_KERNEL_64): the 64-bit entry point.
MIN_BZIMAGE_PROTOCOL = 0x020C
# The setup header version we announce for images that carry none (raw, ELF).
SYNTH_PROTOCOL = 0x020F


class KernelError(AltoVirtError, ValueError):
    """The kernel image cannot be booted; the message says why."""


@dataclass
class Kernel:
    """A kernel placed in guest RAM, ready for its boot protocol."""

    kind: str                       # "bzimage" | "elf" | "pvh" | "raw"
    entry: int                      # guest-physical entry point
    end: int                        # first byte above the loaded image (and its init_size)
    header: bp.setup_header         # copied from a bzImage, synthesized otherwise
    cmdline_max: int                # longest command line the kernel accepts (bytes, no NUL)
    initrd_addr_max: int            # highest address the initrd may end at (inclusive)


def _synth_header() -> bp.setup_header:
    """A setup header for images that have none (boot.rst: required fields)."""
    hdr = bp.setup_header()
    hdr.boot_flag = bp.BOOT_FLAG_MAGIC
    hdr.header = bp.HDRS_MAGIC
    hdr.version = SYNTH_PROTOCOL
    hdr.initrd_addr_max = 0x7FFFFFFF
    hdr.cmdline_size = layout.CMDLINE_MAX_SIZE - 1
    hdr.xloadflags = bp.XLF_KERNEL_64
    hdr.kernel_alignment = 0x200000
    return hdr


def _write(mem: GuestMemory, gpa: int, data: bytes | memoryview, what: str) -> None:
    try:
        mem.write(gpa, data)
    except GuestMemoryError as e:
        raise KernelError(f"{what} ({len(data)} bytes at {gpa:#x}) does not fit in guest RAM "
                          f"({mem.size >> 20} MiB)") from e


def _load_bzimage(mem: GuestMemory, image: bytes) -> Kernel:
    # Only the header's own length is the kernel's (boot.rst: "the end of the setup
    # header" is 0x202 plus the byte at 0x201); later fields stay zero.
    hdr_len = min(0x202 + image[0x201] - bp.SETUP_HEADER_OFFSET, C.sizeof(bp.setup_header))
    raw_hdr = image[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + hdr_len]
    hdr = bp.setup_header.from_buffer_copy(raw_hdr.ljust(C.sizeof(bp.setup_header), b"\0"))
    if hdr.version < MIN_BZIMAGE_PROTOCOL or not hdr.xloadflags & bp.XLF_KERNEL_64:
        raise KernelError(f"bzImage boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02} has "
                          "no 64-bit entry point (needs 2.12 or later with XLF_KERNEL_64)")
    setup_sects = hdr.setup_sects or 4
    payload = memoryview(image)[(setup_sects + 1) * 512:]
    if not payload:
        raise KernelError("bzImage has no protected-mode payload")
    load = layout.HIMEM_START
    _write(mem, load, payload, "bzImage payload")
    end = load + max(len(payload), hdr.init_size)
    if end > mem.regions[0].end:
        raise KernelError(f"bzImage needs {end - load} bytes from {load:#x} (init_size), "
                          "more than guest RAM below 3 GiB")
    return Kernel("bzimage", load + 0x200, end, hdr, hdr.cmdline_size, hdr.initrd_addr_max)


def _elf_notes(image: bytes, off: int, size: int) -> dict[tuple[bytes, int], bytes]:
    notes = {}
    end = off + size
    while off + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(image, off)
        off += _NHDR.size
        name = image[off:off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        notes[(name, ntype)] = image[off:off + descsz]
        off += (descsz + 3) & ~3
    return notes


def _load_elf(mem: GuestMemory, image: bytes) -> Kernel:
    if len(image) < _EHDR.size:
        raise KernelError("ELF image is truncated")
    ident, _, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_ = _EHDR.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise KernelError("ELF image is not a little-endian x86_64 ELF64 file")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(image):
        raise KernelError("ELF program headers are malformed")
    pvh_entry = None
    lowest, end = None, 0
    segments = []
    for i in range(phnum):
        ptype, _, off, vaddr, paddr, filesz, memsz, _ = _PHDR.unpack_from(image, phoff + i * phentsize)
        if off + filesz > len(image) or filesz > memsz:
            raise KernelError(f"ELF segment {i} lies outside the file")
        if ptype == PT_NOTE:
            desc = _elf_notes(image, off, filesz).get((b"Xen", XEN_ELFNOTE_PHYS32_ENTRY))
            if desc and len(desc) in (4, 8):
                pvh_entry = int.from_bytes(desc, "little")
        elif ptype == PT_LOAD and memsz:
            segments.append((vaddr, paddr, memsz))
            _write(mem, paddr, memoryview(image)[off:off + filesz], f"ELF segment {i}")
            # The rest of memsz (.bss) is left as it is: fresh guest RAM is zero, and
            # writing zeros would only make the host allocate pages the guest may not use.
            if paddr + memsz > mem.regions[0].end:
                raise KernelError(f"ELF segment {i} ({memsz} bytes at {paddr:#x}) does not fit "
                                  f"in guest RAM below 3 GiB")
            lowest = paddr if lowest is None else min(lowest, paddr)
            end = max(end, paddr + memsz)
    if lowest is None:
        raise KernelError("ELF image has no loadable segment")
    hdr = _synth_header()
    if pvh_entry is not None:
        return Kernel("pvh", pvh_entry, end, hdr, hdr.cmdline_size, hdr.initrd_addr_max)
    # vmlinux's e_entry may be virtual: translate it through the segment that holds it.
    for vaddr, paddr, memsz in segments:
        if vaddr <= entry < vaddr + memsz:
            entry = entry - vaddr + paddr
            break
    return Kernel("elf", entry, end, hdr, hdr.cmdline_size, hdr.initrd_addr_max)


# An arm64 Image's magic, "ARM\x64" at offset 56 (Documentation/arch/arm64/booting.rst).
ARM64_IMAGE_MAGIC, ARM64_IMAGE_MAGIC_AT = b"ARMd", 56


def _load_raw(mem: GuestMemory, image: bytes) -> Kernel:
    if not image:
        raise KernelError("kernel image is empty")
    if image[ARM64_IMAGE_MAGIC_AT:ARM64_IMAGE_MAGIC_AT + 4] == ARM64_IMAGE_MAGIC:
        raise KernelError("the kernel is an arm64 Image; an x86_64 host boots x86_64 kernels")
    load = layout.RAW_KERNEL_START
    _write(mem, load, image, "raw kernel image")
    hdr = _synth_header()
    return Kernel("raw", load, load + len(image), hdr, hdr.cmdline_size, hdr.initrd_addr_max)


def detect(image: bytes) -> str:
    """The loader for ``image``: "elf", "bzimage" or "raw" (PVH is an ELF detail)."""
    if image[:4] == ELFMAG:
        return "elf"
    if (len(image) >= 0x206 and image[0x202:0x206] == b"HdrS"
            and struct.unpack_from("<H", image, 0x1FE)[0] == bp.BOOT_FLAG_MAGIC):
        return "bzimage"
    return "raw"


def load_kernel(mem: GuestMemory, image: bytes) -> Kernel:
    """Place ``image`` in guest RAM according to its detected format."""
    return {"elf": _load_elf, "bzimage": _load_bzimage, "raw": _load_raw}[detect(image)](mem, image)


def load_initrd(mem: GuestMemory, kernel: Kernel, initrd: bytes) -> int:
    """Place the initrd as high as allowed (below initrd_addr_max and 3 GiB); return its address."""
    top = min(kernel.initrd_addr_max + 1, mem.regions[0].end)
    addr = (top - len(initrd)) & ~0xFFF
    if addr < kernel.end:
        raise KernelError(f"initrd of {len(initrd)} bytes does not fit between the kernel "
                          f"(ends at {kernel.end:#x}) and {top:#x}; give the VM more memory")
    _write(mem, addr, initrd, "initrd")
    return addr
