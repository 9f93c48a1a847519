"""The x86_64 guest-physical memory map AltoVirt builds.

Low memory follows what a PC BIOS leaves behind and what Linux expects
(Documentation/arch/x86/boot.rst, zero-page.rst); the fixed boot structures
sit where Firecracker and StratoVirt put them, so guests written for those
VMMs find nothing surprising.
"""

from __future__ import annotations

from ...memory import Region
from ..board import PciLayout

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Boot structures in the first MiB.
BOOT_GDT_START = 0x500
BOOT_IDT_START = 0x520
PVH_INFO_START = 0x6000          # struct hvm_start_info
PVH_MODLIST_START = 0x6040       # struct hvm_modlist_entry[]
PVH_MEMMAP_START = 0x7000        # struct hvm_memmap_table_entry[] (PVH only)
ZERO_PAGE_START = 0x7000         # struct boot_params (64-bit boot only)
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000               # one page directory: 2 MiB pages over the first GiB
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000       # our own limit; the kernel's cmdline_size may be lower
EBDA_START = 0x9FC00             # MP floating pointer and table live here
EBDA_SIZE = 0x400
ACPI_START = 0xE0000             # RSDP and the ACPI tables (where Linux scans for the RSDP)
ACPI_SIZE = 0xF000
VMGENID_ADDR = 0xEF000           # the VM Generation ID's page, reserved with the tables
BIOS_ROM_START = 0xF0000         # the MP configuration table; reserved up to 1 MiB, as on a PC
RESET_VECTOR = 0xFFFF0           # F000:FFF0, where a CPU (or a BIOS reboot) starts in real mode
HIMEM_START = 0x100000           # bzImage protected-mode code (code32_start)
RAW_KERNEL_START = 0x1000000     # 16 MiB: Linux's default physical load address

# The 32-bit MMIO gap: devices, the IOAPIC and the LAPIC live here.
MMIO_GAP_START = 3 * GiB
MMIO_GAP_END = 4 * GiB
VIRTIO_MMIO_BASE = 0xD0000000    # virtio-mmio slots of 4 KiB from here, as in Firecracker
VIRTIO_MMIO_SLOT = 0x1000
# Their interrupts: IOAPIC pins the legacy devices leave free (1 i8042, 4 COM1, 8 the RTC,
# 23 the GED), one a slot, ISA lines first.
VIRTIO_MMIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17)
# With PCI (-machine q35): the host bridge's 32-bit window for BARs, then its ECAM, 1 MiB a
# bus for all 256 (PCI Express Base 4.0, 7.2.2); its 64-bit window starts at the first GiB
# past RAM. The virtio-mmio slots stay unused there.
PCI_MMIO32_START = 0xC0000000
PCI_MMIO32_SIZE = 256 * MiB
PCI_ECAM_START = 0xE0000000
PCI_ECAM_SIZE = 256 * MiB
PCI_MMIO64_SIZE = 64 * GiB
# INTA# to INTD#, for a guest without MSI: IOAPIC pins of the PCI range (16 to 23) that the
# virtio-mmio slots take only on microvm, as QEMU's q35 gives PIRQE-H to 20-23.
PCI_INTX_GSIS = (16, 17, 18, 19)
IOAPIC_ADDR = 0xFEC00000
APIC_ADDR = 0xFEE00000
# Where VMX keeps its real-mode TSS and identity map: the top of the 32-bit space,
# below the BIOS, outside RAM (KVM_SET_TSS_ADDR needs three pages).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# e820 types (arch/x86/include/uapi/asm/e820.h via bootparam.h).
E820_RAM = 1
E820_RESERVED = 2

MEM_MIN = 128 * MiB
MEM_MAX = 512 * GiB


def ram_regions(size: int) -> list[Region]:
    """RAM of ``size`` bytes: below the MMIO gap, and the rest above 4 GiB."""
    low = min(size, MMIO_GAP_START)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(MMIO_GAP_END, size - low, low))
    return regions


def mmio_slot(index: int) -> tuple[int, int, int]:
    """The base address, size and interrupt (GSI) of virtio-mmio slot ``index``; IndexError
    past the last slot."""
    if not 0 <= index < len(VIRTIO_MMIO_IRQS):
        raise IndexError(f"virtio-mmio slot {index}: the machine has {len(VIRTIO_MMIO_IRQS)}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT, VIRTIO_MMIO_SLOT, VIRTIO_MMIO_IRQS[index]


def pci_layout(regions: list[Region]) -> PciLayout:
    """The host bridge's ranges around RAM ``regions``: its 64-bit window from the first GiB
    boundary past RAM."""
    mmio64 = max(MMIO_GAP_END, (regions[-1].end + GiB - 1) & ~(GiB - 1))
    return PciLayout((PCI_ECAM_START, PCI_ECAM_SIZE), (PCI_MMIO32_START, PCI_MMIO32_SIZE),
                     (mmio64, PCI_MMIO64_SIZE), PCI_INTX_GSIS)


def e820_map(regions: list[Region], pci: bool = False) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries, sorted: low RAM, the BIOS holes, the MMIO gap. With ``pci``
    the gap is reserved only where the ECAM and the APICs are: Linux clips a host bridge's
    windows to what the e820 map leaves free, and wants the ECAM reserved there."""
    low = regions[0]
    gap = [(MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START, E820_RESERVED)] if not pci else [
        (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
        (IOAPIC_ADDR, MMIO_GAP_END - IOAPIC_ADDR, E820_RESERVED)]
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        (ACPI_START, HIMEM_START - ACPI_START, E820_RESERVED),
        (HIMEM_START, low.end - HIMEM_START, E820_RAM),
        *gap,
    ]
    entries += [(r.gpa, r.size, E820_RAM) for r in regions[1:]]
    return entries
