"""PCI: a PCIe root complex's configuration space, its functions and their BARs, MSI-X.

The root (:mod:`.root`) decodes configuration accesses (ECAM and, on a PC, ports
0xCF8/0xCFC) to the function at bus/device/function; each function keeps its
256-byte header and capability list in a :class:`.config.ConfigSpace` and maps its
BARs on the MMIO bus when the driver enables memory decoding.
"""
