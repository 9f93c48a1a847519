"""The VM Generation ID: 16 bytes in guest RAM that change when a VM is cloned.

Microsoft's "Virtual Machine Generation ID" (as QEMU's vmgenid device and Firecracker
provide it): the DSDT's VGEN device (``_CID`` VM_Gen_Counter) names the guest-physical
address of a GUID in its ``ADDR`` package; when a VM starts again from a snapshot
the VMM writes a new GUID there and notifies VGEN through the Generic Event Device.
Linux's vmgenid driver mixes the GUID into its RNG at boot and, on the
notification, reseeds it: two clones of one snapshot never share random state.
The GUID is kept in Microsoft's byte order (the first three fields little-endian),
as QEMU writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ...acpi import aml
from ...memory import GuestMemory

VMGENID_SIZE = 16
# Our own hardware ID (an ACPI ID needs four hex digits, which "VMGENCTR" lacks) and the
# spec's compatible ID, which ACPICA upper-cases into what drivers/virt/vmgenid.c matches
# (VM_GEN_COUNTER), as for QEMU's.
VMGENID_HID = "ALTV0001"
VMGENID_CID = "VM_Gen_Counter"
VMGENID_PATH = "\\_SB.VGEN"         # the Generic Event Device notifies it (devices/legacy/acpi.py)
NOTIFY_VMGENID_CHANGED = 0x80       # Microsoft's VM Generation ID spec: the ID changed


def new_id() -> bytes:
    """A random (version 4) GUID, in the guest's byte order."""
    raw = bytearray(os.urandom(VMGENID_SIZE))
    raw[7] = (raw[7] & 0x0F) | 0x40         # version 4: the high nibble of time_hi_and_version
    raw[8] = (raw[8] & 0x3F) | 0x80         # the RFC 4122 variant
    return bytes(raw)


def guid_string(raw: bytes) -> str:
    """The GUID as text (what QMP's query-vm-generation-id answers)."""
    le = int.from_bytes
    return (f"{le(raw[0:4], 'little'):08x}-{le(raw[4:6], 'little'):04x}-{le(raw[6:8], 'little'):04x}-"
            f"{raw[8:10].hex()}-{raw[10:16].hex()}")


class VmGenId:
    """The GUID at ``addr`` in ``mem``; ``notify()`` raises the GED's VM generation event."""

    def __init__(self, mem: GuestMemory, addr: int, notify: Callable[[], None]) -> None:
        self._mem = mem
        self.addr = addr
        self._notify = notify
        self.id = new_id()

    def acpi_device(self) -> bytes:
        """VGEN in the DSDT: a Device term for ``\\_SB`` whose ``ADDR`` package holds the GUID's
        guest-physical address, low and high 32 bits (the spec's form)."""
        address = aml.package(aml.integer(self.addr & 0xFFFFFFFF), aml.integer(self.addr >> 32))
        return aml.device("VGEN", aml.name("_HID", aml.string(VMGENID_HID)),
                          aml.name("_CID", aml.string(VMGENID_CID)),
                          aml.name("_DDN", aml.string(VMGENID_CID)), aml.name("ADDR", address))

    def write(self) -> None:
        """Put the GUID in guest RAM (at power-on and after a reset, which clears RAM)."""
        self._mem.write(self.addr, self.id)

    def taken_from_ram(self) -> None:
        """The GUID is the one in RAM (a live migration's destination: the same VM goes on)."""
        self.id = self._mem.read(self.addr, VMGENID_SIZE)

    def change(self) -> None:
        """A new GUID, and the guest told (a VM restored from a snapshot, possibly one of many)."""
        self.id = new_id()
        self.write()
        self._notify()
