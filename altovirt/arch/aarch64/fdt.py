"""The flattened device tree an arm64 guest boots with, written with dtc's libfdt
(``pylibfdt``: the ``libfdt`` module) in its sequential-write mode.

What it holds follows QEMU's virt machine (hw/arm/virt.c) and the kernel's bindings
(Documentation/devicetree/bindings/): the memory, the CPUs by MPIDR with PSCI as their
enable method, the GIC (v3, or v2), the architected timer, the PL011 UART, PL031 RTC and PL061 GPIO
with their APB clock, the power button on a GPIO line, every virtio-mmio slot in use, and
``/chosen`` with the command line, the initrd and seeds for the guest's RNG and KASLR.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ...memory import Region
from ..board import PciLayout
from . import layout
from .gic import Gic

# Interrupt specifier cells for the GIC bindings (arm,gic-v3.yaml, arm,gic.yaml): type,
# number, flags; a GICv2's PPI flags name the CPUs it goes to in bits 8-15.
GIC_FDT_IRQ_TYPE_SPI = 0
GIC_FDT_IRQ_TYPE_PPI = 1
IRQ_TYPE_EDGE_RISING = 1
IRQ_TYPE_LEVEL_HIGH = 4
GIC_FDT_IRQ_PPI_CPU_SHIFT = 8

# phandles the nodes refer to each other by.
PHANDLE_GIC = 1
PHANDLE_APB_CLOCK = 2
PHANDLE_GPIO = 3
PHANDLE_ITS = 4
# PCI bus bindings (Documentation/devicetree/bindings/pci/host-generic-pci.yaml, IEEE 1275's
# PCI binding): a child address's first cell says the space, 32- or 64-bit memory.
PCI_SPACE_MEM32, PCI_SPACE_MEM64 = 0x0200_0000, 0x0300_0000
PCI_DEVICE_SHIFT = 11               # the device number's place in a child address's first cell
APB_CLOCK_HZ = 24_000_000           # the rate QEMU's virt gives its "clk24mhz"


@dataclass(frozen=True)
class DeviceTreeInputs:
    """Everything the device tree describes."""

    memory: Sequence[Region]
    mpidrs: Sequence[int]                       # each vCPU's MPIDR affinity, in vCPU order
    cmdline: str
    initrd: tuple[int, int] | None              # (address, size)
    virtio: Sequence[tuple[int, int]]           # (base, SPI) of each virtio-mmio slot in use
    gic: Gic
    pci: PciLayout | None = None                # a PCIe host bridge (MSIs through the GIC's ITS)


Props = dict[str, bytes | str | int]          # a node's properties: cells, a string, one u32


def _cells(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in values)


def _reg(*pairs: tuple[int, int]) -> bytes:
    """``reg`` with two address and two size cells."""
    return b"".join(_cells(a >> 32, a & 0xFFFFFFFF, s >> 32, s & 0xFFFFFFFF) for a, s in pairs)


def _strings(*values: str) -> bytes:
    return b"".join(v.encode() + b"\0" for v in values)


def build(inputs: DeviceTreeInputs) -> bytes:
    """The device tree blob. ValueError if it outgrows :data:`layout.FDT_MAX_SIZE`."""
    import libfdt  # only an arm64 VM builds a device tree

    fdt = libfdt.FdtSw()
    fdt.finish_reservemap()

    def node(name: str, props: Props, *children: tuple[str, Props]) -> None:
        fdt.begin_node(name)
        for key, value in props.items():
            if isinstance(value, str):
                fdt.property_string(key, value)
            elif isinstance(value, int):
                fdt.property_u32(key, value)
            else:
                fdt.property(key, value)
        for child in children:
            node(*child)
        fdt.end_node()

    fdt.begin_node("")
    for key, value in (("compatible", _strings("linux,dummy-virt")), ("model", b"AltoVirt\0"),
                       ("interrupt-parent", _cells(PHANDLE_GIC)), ("#address-cells", _cells(2)),
                       ("#size-cells", _cells(2))):
        fdt.property(key, value)

    chosen: Props = {
        "bootargs": inputs.cmdline,
        "stdout-path": f"/pl011@{layout.UART_BASE:x}",
        "rng-seed": os.urandom(64),
        "kaslr-seed": os.urandom(8),
    }
    if inputs.initrd is not None:
        start, size = inputs.initrd
        chosen["linux,initrd-start"] = (start).to_bytes(8, "big")
        chosen["linux,initrd-end"] = (start + size).to_bytes(8, "big")
    node("chosen", chosen)

    for region in inputs.memory:
        node(f"memory@{region.gpa:x}", {"device_type": "memory", "reg": _reg((region.gpa, region.size))})

    fdt.begin_node("cpus")
    fdt.property("#address-cells", _cells(2))
    fdt.property("#size-cells", _cells(0))
    for index, mpidr in enumerate(inputs.mpidrs):
        node(f"cpu@{index}", {"device_type": "cpu", "compatible": "arm,arm-v8", "enable-method": "psci",
                              "reg": _cells(mpidr >> 32, mpidr & 0xFFFFFFFF)})
    fdt.end_node()

    # PSCI through HVC: KVM implements it (KVM_ARM_VCPU_PSCI_0_2).
    node("psci", {"compatible": _strings("arm,psci-1.0", "arm,psci-0.2"), "method": "hvc"})

    gic_regs = [(layout.GIC_DIST_BASE, layout.GIC_DIST_SIZE), *inputs.gic.regions]
    ppi_flags = IRQ_TYPE_LEVEL_HIGH
    if inputs.gic.version == 3:
        # arm,gic-v3-its: an MSI controller, whose device IDs are one cell.
        its: list[tuple[str, Props]] = [] if inputs.gic.its is None else [
            (f"its@{inputs.gic.its[0]:x}", {"compatible": "arm,gic-v3-its", "msi-controller": b"",
                                            "#msi-cells": 1, "reg": _reg(inputs.gic.its),
                                            "phandle": PHANDLE_ITS})]
        node(f"intc@{layout.GIC_DIST_BASE:x}", {
            "compatible": "arm,gic-v3", "#interrupt-cells": 3, "interrupt-controller": b"",
            "#address-cells": 2, "#size-cells": 2, "ranges": b"",
            "#redistributor-regions": len(inputs.gic.regions), "reg": _reg(*gic_regs),
            "interrupts": _cells(GIC_FDT_IRQ_TYPE_PPI, layout.GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH),
            "phandle": PHANDLE_GIC}, *its)
    else:
        ppi_flags |= ((1 << len(inputs.mpidrs)) - 1) << GIC_FDT_IRQ_PPI_CPU_SHIFT
        node(f"intc@{layout.GIC_DIST_BASE:x}", {
            "compatible": "arm,cortex-a15-gic", "#interrupt-cells": 3, "interrupt-controller": b"",
            "reg": _reg(*gic_regs), "phandle": PHANDLE_GIC})

    node("timer", {"compatible": _strings("arm,armv8-timer", "arm,armv7-timer"), "always-on": b"",
                   "interrupts": b"".join(_cells(GIC_FDT_IRQ_TYPE_PPI, ppi, ppi_flags)
                                          for ppi in layout.TIMER_PPIS)})

    # The AMBA devices' bus clock: Linux's amba bus enables "apb_pclk" before probing them.
    node("apb-pclk", {"compatible": "fixed-clock", "#clock-cells": 0, "clock-frequency": APB_CLOCK_HZ,
                      "clock-output-names": "clk24mhz", "phandle": PHANDLE_APB_CLOCK})
    for name, base, spi, clocks in (("pl011", layout.UART_BASE, layout.UART_SPI, ("uartclk", "apb_pclk")),
                                    ("pl031", layout.RTC_BASE, layout.RTC_SPI, ("apb_pclk",)),
                                    ("pl061", layout.GPIO_BASE, layout.GPIO_SPI, ("apb_pclk",))):
        extra: Props = {}
        if name == "pl061":
            extra = {"gpio-controller": b"", "#gpio-cells": 2, "phandle": PHANDLE_GPIO}
        node(f"{name}@{base:x}", {
            "compatible": _strings(f"arm,{name}", "arm,primecell"), "reg": _reg((base, layout.PL0X1_SIZE)),
            "interrupts": _cells(GIC_FDT_IRQ_TYPE_SPI, spi, IRQ_TYPE_LEVEL_HIGH),
            "clocks": _cells(*(PHANDLE_APB_CLOCK for _ in clocks)), "clock-names": _strings(*clocks),
            **extra})
    # The power button: a key on the GPIO line, as QEMU's virt has it (gpio-keys.yaml).
    fdt.begin_node("gpio-keys")
    fdt.property_string("compatible", "gpio-keys")
    node("poweroff", {"label": "GPIO Key Poweroff", "linux,code": layout.KEY_POWER,
                      "gpios": _cells(PHANDLE_GPIO, layout.POWER_BUTTON_LINE, 0)})
    fdt.end_node()

    # virtio-mmio interrupts are edges, as QEMU's virt and Firecracker declare them: an irqfd
    # raises one, and the driver reads InterruptStatus to learn why.
    for base, spi in inputs.virtio:
        node(f"virtio_mmio@{base:x}", {
            "compatible": "virtio,mmio", "reg": _reg((base, layout.VIRTIO_MMIO_SLOT)), "dma-coherent": b"",
            "interrupts": _cells(GIC_FDT_IRQ_TYPE_SPI, spi, IRQ_TYPE_EDGE_RISING)})

    if inputs.pci is not None:
        node(f"pcie@{inputs.pci.ecam[0]:x}", _pcie(inputs.pci, its=inputs.gic.its is not None,
                                                   gic_address_cells=2 if inputs.gic.version == 3 else 0))

    fdt.end_node()
    blob = bytes(fdt.as_fdt().as_bytearray())
    if len(blob) > layout.FDT_MAX_SIZE:
        raise ValueError(f"the device tree is {len(blob)} bytes; at most {layout.FDT_MAX_SIZE} fit")
    return blob


def _pcie(pci: PciLayout, *, its: bool, gic_address_cells: int) -> Props:
    """The generic ECAM host bridge (host-generic-pci.yaml): its buses, its two memory windows
    mapped one to one, with an ``its`` every requester ID's MSIs to it as that device ID
    (msi-map, pci-msi.txt; a GICv2 host's guest has INTx only), and each slot's INTA# to
    INTD# to its SPI, rotated by slot as on x86 (each entry with as many unit address cells as
    the GIC's node has, which Linux's of_irq_parse_raw counts)."""
    (ecam, ecam_size), windows = pci.ecam, ((PCI_SPACE_MEM32, *pci.mmio32), (PCI_SPACE_MEM64, *pci.mmio64))
    ranges = b"".join(_cells(space, base >> 32, base & 0xFFFFFFFF, base >> 32, base & 0xFFFFFFFF,
                             size >> 32, size & 0xFFFFFFFF) for space, base, size in windows)
    slots = 32
    interrupt_map = b"".join(
        _cells(slot << PCI_DEVICE_SHIFT, 0, 0, pin + 1, PHANDLE_GIC, *(0,) * gic_address_cells,
               GIC_FDT_IRQ_TYPE_SPI, pci.intx[(slot + pin) % len(pci.intx)], IRQ_TYPE_LEVEL_HIGH)
        for slot in range(slots) for pin in range(4))
    return {"compatible": "pci-host-ecam-generic", "device_type": "pci", "#address-cells": 3,
            "#size-cells": 2, "#interrupt-cells": 1, "reg": _reg((ecam, ecam_size)),
            "bus-range": _cells(0, ecam_size // (1 << 20) - 1), "linux,pci-domain": 0, "dma-coherent": b"",
            "ranges": ranges, **({"msi-map": _cells(0, PHANDLE_ITS, 0, 0x10000)} if its else {}),
            "interrupt-map-mask": _cells(0x1F << PCI_DEVICE_SHIFT, 0, 0, 7), "interrupt-map": interrupt_map}
