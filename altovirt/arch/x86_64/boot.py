"""Put a kernel, its command line, initrd and boot information in guest RAM.

:func:`prepare` writes everything the boot protocol needs, the :class:`Firmware`
too, and returns a :class:`BootPlan`; :func:`setup_vcpus` then gives each vCPU its
initial state, and :func:`setup_boot_regs` the boot vCPU its entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...acpi.tables import ResetRegister
from ...config.model import CpuTemplate
from ...kvm import Kvm, Vcpu
from ...kvm import structs as S
from ...memory import GuestMemory
from . import acpi, cpuid, layout, mptable, regs
from . import bootparams as bp
from .acpi import AcpiTables
from .loader import Kernel, KernelError, load_initrd, load_kernel
from .pvh import (
    HVM_START_INFO_VERSION,
    XEN_HVM_START_MAGIC_VALUE,
    hvm_memmap_table_entry,
    hvm_modlist_entry,
    hvm_start_info,
)


@dataclass(frozen=True)
class Firmware:
    """What stands in for firmware besides the MP table: the ACPI tables (None: no ACPI,
    ``-machine acpi=off``), and the register the reset vector's stub resets through."""

    acpi: AcpiTables | None
    reset: ResetRegister
    pci: bool = False           # the e820 map leaves the PCI windows free


def reset_stub(reset: ResetRegister) -> bytes:
    """What firmware does at the reset vector, for a VM: reset. Linux reboots through it when
    other ways fail, and on a hardware-reduced ACPI machine without EFI it tries nothing else
    (reboot_init() picks BOOT_EFI, which falls back to BOOT_BIOS: a jump to F000:FFF0). Real-
    mode code: mov al, value; out port, al (the i8042's: pulse its reset line); hlt; jmp back
    to the hlt. ValueError for a port that ``out imm8`` cannot name."""
    if not 0 <= reset.port <= 0xFF or not 0 <= reset.value <= 0xFF:
        raise ValueError(f"the reset stub writes a byte to ports 0-0xff, not {reset}")
    return bytes([0xB0, reset.value, 0xE6, reset.port, 0xF4, 0xEB, 0xFD])


@dataclass(frozen=True)
class BootPlan:
    """How the boot vCPU must start."""

    kind: str            # kernel format, as detected
    entry: int
    long_mode: bool      # False: PVH's 32-bit entry
    info_addr: int       # zero page (RSI) or hvm_start_info (EBX)
    initrd_addr: int
    initrd_size: int


def _zero_page(kernel: Kernel, cmdline_size: int, initrd: tuple[int, int],
               e820: list[tuple[int, int, int]], rsdp_addr: int) -> bp.boot_params:
    params = bp.boot_params()
    params.acpi_rsdp_addr = rsdp_addr           # boot protocol 2.14; older kernels scan for it
    params.hdr = kernel.header
    hdr = params.hdr
    hdr.type_of_loader = bp.LOADER_TYPE_UNDEFINED
    hdr.loadflags |= bp.CAN_USE_HEAP
    hdr.heap_end_ptr = 0xFE00
    hdr.cmd_line_ptr = layout.CMDLINE_START & 0xFFFFFFFF
    params.ext_cmd_line_ptr = layout.CMDLINE_START >> 32
    if cmdline_size and kernel.kind != "bzimage":
        hdr.cmdline_size = cmdline_size
    addr, size = initrd
    hdr.ramdisk_image, params.ext_ramdisk_image = addr & 0xFFFFFFFF, addr >> 32
    hdr.ramdisk_size, params.ext_ramdisk_size = size & 0xFFFFFFFF, size >> 32
    for i, (base, length, kind) in enumerate(e820):
        params.e820_table[i] = bp.boot_e820_entry(base, length, kind)
    params.e820_entries = len(e820)
    return params


def _start_info(mem: GuestMemory, initrd: tuple[int, int],
                e820: list[tuple[int, int, int]], rsdp_addr: int) -> None:
    info = hvm_start_info(magic=XEN_HVM_START_MAGIC_VALUE, version=HVM_START_INFO_VERSION,
                          cmdline_paddr=layout.CMDLINE_START, rsdp_paddr=rsdp_addr,
                          memmap_paddr=layout.PVH_MEMMAP_START, memmap_entries=len(e820))
    if initrd[1]:
        info.nr_modules = 1
        info.modlist_paddr = layout.PVH_MODLIST_START
        mem.write(layout.PVH_MODLIST_START, bytes(hvm_modlist_entry(paddr=initrd[0], size=initrd[1])))
    table = b"".join(bytes(hvm_memmap_table_entry(a, s, t)) for a, s, t in e820)
    mem.write(layout.PVH_MEMMAP_START, table)
    mem.write(layout.PVH_INFO_START, bytes(info))


def prepare(mem: GuestMemory, image: bytes, cmdline: str, initrd: bytes | None,
            cpus: int, firmware: Firmware) -> BootPlan:
    """Load the kernel and write every boot structure: the MP table for ``cpus``, the
    ``firmware``, the zero page or PVH start info; KernelError if it cannot boot."""
    kernel = load_kernel(mem, image)
    raw_cmdline = cmdline.encode()
    limit = min(kernel.cmdline_max, layout.CMDLINE_MAX_SIZE - 1) if kernel.cmdline_max \
        else layout.CMDLINE_MAX_SIZE - 1
    if len(raw_cmdline) > limit:
        raise KernelError(f"kernel command line is {len(raw_cmdline)} bytes with what the machine "
                          f"adds to -append; this kernel accepts at most {limit}")
    mem.write(layout.CMDLINE_START, raw_cmdline + b"\0")
    initrd_loc = (load_initrd(mem, kernel, initrd), len(initrd)) if initrd else (0, 0)
    e820 = layout.e820_map(mem.regions, firmware.pci)
    mptable.write(mem, cpus)
    mem.write(layout.RESET_VECTOR, reset_stub(firmware.reset))
    rsdp_addr = 0
    if firmware.acpi is not None:
        acpi.write(mem, firmware.acpi)
        rsdp_addr = firmware.acpi.rsdp_addr
    long_mode = kernel.kind != "pvh"
    if long_mode:
        params = _zero_page(kernel, limit, initrd_loc, e820, rsdp_addr)
        mem.write(layout.ZERO_PAGE_START, bytes(params))
        regs.write_boot_tables(mem, regs.GDT_64, paging=True)
        info = layout.ZERO_PAGE_START
    else:
        _start_info(mem, initrd_loc, e820, rsdp_addr)
        regs.write_boot_tables(mem, regs.GDT_32, paging=False)
        info = layout.PVH_INFO_START
    return BootPlan(kernel.kind, kernel.entry, long_mode, info, *initrd_loc)


def setup_vcpu(vcpu: Vcpu, supported: list[S.kvm_cpuid_entry2], count: int, msrs: dict[int, int]) -> None:
    """CPUID, MSRs, FPU and LAPIC, for every vCPU."""
    vcpu.set_cpuid2(cpuid.vcpu_cpuid(supported, vcpu.index, count))
    vcpu.set_msrs(msrs)
    regs.setup_fpu(vcpu)
    regs.setup_lapic(vcpu)


def setup_vcpus(kvm: Kvm, vcpus: Sequence[Vcpu], template: CpuTemplate) -> list[int]:
    """Every vCPU's CPUID (``template`` applied), boot MSRs (and the template's), FPU and LAPIC;
    returns the MSRs the power-on state must keep (the boot MSRs the host accepted, and the
    template's). VmmError if the template asks for what KVM does not have."""
    supported = cpuid.apply_template(kvm.supported_cpuid(), template)
    msrs: dict[int, int] = {}
    for vcpu in vcpus:
        msrs = regs.set_boot_msrs(vcpu)
        setup_vcpu(vcpu, supported, len(vcpus), msrs)
    if template.msr_modifiers and vcpus:
        msrs = {**msrs, **cpuid.set_template_msrs(vcpus, template)}
    return list(msrs)


def setup_boot_regs(vcpu: Vcpu, plan: BootPlan) -> None:
    """The boot vCPU's registers, at the kernel's entry (the others wait for INIT/SIPI in
    the in-kernel LAPIC)."""
    gdt = regs.GDT_64 if plan.long_mode else regs.GDT_32
    regs.setup_sregs(vcpu, gdt, plan.long_mode)
    regs.setup_regs(vcpu, plan.entry, plan.long_mode, plan.info_addr)

