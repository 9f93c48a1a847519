"""The aarch64 guest-physical memory map AltoVirt builds: QEMU's ``virt`` machine's
(hw/arm/virt.c ``base_memmap``, ``a15irqmap``), which StratoVirt's follows too, so a guest,
a device tree or an ``earlycon=pl011,0x9000000`` written for those finds the same devices
at the same addresses and interrupts.

Interrupts are numbered as the device tree numbers SPIs: SPI ``n`` is the GIC's INTID
``32 + n``, and the ``gsi`` KVM_IRQFD takes for it on arm64 (vgic-irqfd.c routes GSI ``n``
to SPI ``n``).
"""

from __future__ import annotations

from ...memory import Region
from ..board import PciLayout

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The GIC: one 64 KiB distributor; a GICv3's redistributors (two 64 KiB frames a vCPU).
GIC_DIST_BASE = 0x0800_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST_BASE = 0x080A_0000
GIC_REDIST_SIZE = 0xF6_0000          # room for 123 vCPUs, up to the UART
GIC_REDIST_STRIDE = 0x2_0000         # GICv3 architecture spec 12.10: RD_base and SGI_base frames
# A GICv2's CPU interface, where a host has no GICv3 (QEMU virt's VIRT_GIC_CPU).
GIC_CPU_BASE = 0x0801_0000
GIC_CPU_SIZE = 0x1_0000
# Interrupts the in-kernel GIC models: the 32 private ones and SPIs up to the virtio slots'.
GIC_NR_IRQS = 128
GIC_SPI_BASE = 32                    # INTID of SPI 0
GIC_MAINTENANCE_PPI = 9

# The architected timer's PPIs, as QEMU's virt gives them (secure, non-secure, virtual, hyp).
TIMER_PPIS = (13, 14, 11, 10)

UART_BASE, UART_SPI = 0x0900_0000, 1       # PL011
RTC_BASE, RTC_SPI = 0x0901_0000, 2         # PL031
GPIO_BASE, GPIO_SPI = 0x0903_0000, 7       # PL061
POWER_BUTTON_LINE = 3                      # its line the power button (gpio-keys) is on
KEY_POWER = 116                            # <linux/input-event-codes.h>
PL0X1_SIZE = 0x1000
# The boot timer (altovirt.devices.legacy.boottimer) on a page QEMU's virt leaves empty.
BOOT_TIMER_BASE = 0x090C_0000

VIRTIO_MMIO_BASE = 0x0A00_0000
VIRTIO_MMIO_SLOT = 0x200
VIRTIO_MMIO_SLOTS = 32
VIRTIO_MMIO_SPI = 16

# PCIe, where QEMU's virt has it (VIRT_PCIE_MMIO, VIRT_PCIE_ECAM, VIRT_PCIE's SPIs): a
# 32-bit BAR window and the ECAM (16 buses) below RAM, INTA# to INTD# on SPIs 3-6, and a
# 64-bit window from the first 64 GiB boundary past RAM; MSIs go to the GICv3's ITS
# (VIRT_GIC_ITS), which turns them into LPIs.
PCI_MMIO32_START, PCI_MMIO32_SIZE = 0x1000_0000, 0x2EFF_0000
PCI_ECAM_START, PCI_ECAM_SIZE = 0x3F00_0000, 16 * MiB
PCI_MMIO64_SIZE = 64 * GiB
PCI_INTX_SPIS = (3, 4, 5, 6)
GIC_ITS_BASE, GIC_ITS_SIZE = 0x0808_0000, 0x2_0000

RAM_START = 0x4000_0000
MEM_MIN = 128 * MiB
MEM_MAX = 512 * GiB

# The device tree: at most 2 MiB and 8-byte aligned (Documentation/arch/arm64/booting.rst, 2).
FDT_MAX_SIZE = 2 * MiB


def ram_regions(size: int) -> list[Region]:
    """RAM of ``size`` bytes, in one piece from 1 GiB."""
    return [Region(RAM_START, size, 0)]


def mmio_slot(index: int) -> tuple[int, int, int]:
    """The base address, size and SPI of virtio-mmio slot ``index``; IndexError past the
    last slot."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise IndexError(f"virtio-mmio slot {index}: the machine has {VIRTIO_MMIO_SLOTS}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT, VIRTIO_MMIO_SLOT, VIRTIO_MMIO_SPI + index


def redist_regions(cpus: int, ram_end: int) -> list[tuple[int, int]]:
    """(base, size) of the GICv3 redistributor regions for ``cpus`` vCPUs: the low region
    QEMU's virt has, then, past 123 vCPUs, a second one above RAM (as QEMU's
    ``VIRT_HIGH_GIC_REDIST2``), 64 KiB aligned."""
    low_cpus = GIC_REDIST_SIZE // GIC_REDIST_STRIDE
    regions = [(GIC_REDIST_BASE, min(cpus, low_cpus) * GIC_REDIST_STRIDE)]
    if cpus > low_cpus:
        high = (ram_end + GiB - 1) & ~(GiB - 1)
        regions.append((high, (cpus - low_cpus) * GIC_REDIST_STRIDE))
    return regions


def pci_layout(regions: list[Region]) -> PciLayout:
    """The host bridge's ranges around RAM ``regions``."""
    mmio64 = (regions[-1].end + PCI_MMIO64_SIZE - 1) & ~(PCI_MMIO64_SIZE - 1)
    return PciLayout((PCI_ECAM_START, PCI_ECAM_SIZE), (PCI_MMIO32_START, PCI_MMIO32_SIZE),
                     (mmio64, PCI_MMIO64_SIZE), PCI_INTX_SPIS)
