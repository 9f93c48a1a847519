"""Put an arm64 kernel, its initrd and device tree in guest RAM
(Documentation/arch/arm64/booting.rst).

The kernel is an ``Image`` (or one compressed with gzip, as Debian's ``vmlinuz`` is): placed
``text_offset`` bytes past the start of RAM, which is 2 MiB aligned. The device tree goes in
the last 2 MiB of RAM below 4 GiB's worth of it, the initrd just below the device tree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import AltoVirtError
from ...memory import GuestMemory
from ..board import PciLayout
from . import fdt, layout
from .gic import Gic

# The Image header (booting.rst, 3): code0, code1, text_offset, image_size, flags, res2-4,
# magic, res5.
_HEADER = struct.Struct("<IIQQQQQQII")
IMAGE_MAGIC = 0x644D5241            # "ARM\x64"
LEGACY_TEXT_OFFSET = 0x80000        # image_size 0: a kernel older than 3.17
GZIP_MAGIC = b"\x1f\x8b"
PAGE = 4096
# Where Linux's decompressed Image may be at most (Debian's arm64 kernels are some 30 MiB).
MAX_IMAGE = 256 * layout.MiB
COMMAND_LINE_SIZE = 2048            # arch/arm64/include/uapi/asm/setup.h, with its NUL


class KernelError(AltoVirtError, ValueError):
    """The kernel image cannot be booted; the message says why."""


@dataclass(frozen=True)
class Firmware:
    """What the machine describes to the guest: its virtio-mmio slots in use (base, SPI) and
    its GIC; the device tree is written at load, when the initrd's place is known."""

    virtio: tuple[tuple[int, int], ...]
    gic: Gic
    pci: PciLayout | None = None


@dataclass(frozen=True)
class BootPlan:
    """How the boot vCPU must start."""

    kind: str            # "image"
    entry: int
    fdt_addr: int
    initrd_addr: int
    initrd_size: int


def _decompress(image: bytes) -> bytes:
    """``image``, gunzipped if it is gzip data; KernelError if that fails."""
    if not image.startswith(GZIP_MAGIC):
        return image
    import zlib  # only for a compressed kernel
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(image, MAX_IMAGE)
    except zlib.error as e:
        raise KernelError(f"the kernel is gzip data that does not decompress: {e}") from None
    if d.unconsumed_tail:
        raise KernelError(f"the kernel decompresses to more than {MAX_IMAGE >> 20} MiB")
    return out


def mpidr(index: int) -> int:
    """The MPIDR affinity KVM gives vCPU ``index`` (arch/arm64/kvm/sys_regs.c, reset_mpidr):
    16 a cluster in Aff0, then Aff1 and Aff2."""
    return (index & 0xF) | ((index >> 4) & 0xFF) << 8 | ((index >> 12) & 0xFF) << 16


def prepare(mem: GuestMemory, image: bytes, cmdline: str, initrd: bytes | None,
            cpus: int, firmware: Firmware) -> BootPlan:
    """Load the kernel, the initrd and the device tree; KernelError if it cannot boot."""
    if len(cmdline.encode()) >= COMMAND_LINE_SIZE:
        raise KernelError(f"kernel command line is {len(cmdline.encode())} bytes with what the machine "
                          f"adds to -append; an arm64 kernel accepts at most {COMMAND_LINE_SIZE - 1}")
    kernel = _decompress(image)
    if len(kernel) < _HEADER.size:
        raise KernelError(f"the kernel is {len(kernel)} bytes: too short for an arm64 Image header")
    _, _, text_offset, image_size, _, _, _, _, magic, _ = _HEADER.unpack_from(kernel)
    if magic != IMAGE_MAGIC:
        kind = "an x86 bzImage" if kernel[0x202:0x206] == b"HdrS" else "not an arm64 Image"
        raise KernelError(f"the kernel is {kind} (no \"ARM\\x64\" magic at offset 56); an aarch64 host "
                          "boots arm64 kernels")
    if image_size == 0:
        text_offset, image_size = LEGACY_TEXT_OFFSET, len(kernel)
    image_size = max(image_size, len(kernel))
    ram = mem.regions[0]
    entry = ram.gpa + text_offset
    kernel_end = entry + image_size
    # The device tree in the last 2 MiB of RAM (within the first 4 GiB of it: the initrd and
    # device tree stay within reach of 32-bit DMA), the initrd just below, page aligned.
    top = min(ram.end, ram.gpa + 4 * layout.GiB)
    fdt_addr = top - layout.FDT_MAX_SIZE
    initrd_addr = (fdt_addr - len(initrd)) & ~(PAGE - 1) if initrd else 0
    if (initrd_addr if initrd else fdt_addr) < kernel_end:
        need = (kernel_end - ram.gpa + (len(initrd) if initrd else 0) + layout.FDT_MAX_SIZE) >> 20
        raise KernelError(f"the kernel, initrd and device tree need about {need + 1} MiB of RAM; "
                          f"the VM has {ram.size >> 20} MiB")
    mem.write(entry, kernel)
    if initrd:
        mem.write(initrd_addr, initrd)
    blob = fdt.build(fdt.DeviceTreeInputs(
        memory=mem.regions, mpidrs=[mpidr(i) for i in range(cpus)], cmdline=cmdline,
        initrd=(initrd_addr, len(initrd)) if initrd else None, virtio=firmware.virtio,
        gic=firmware.gic, pci=firmware.pci))
    mem.write(fdt_addr, blob)
    return BootPlan("image", entry, fdt_addr, initrd_addr, len(initrd) if initrd else 0)
