"""Boot structures against Linux's <asm/bootparam.h> and Xen's hvm/start_info.h."""

from __future__ import annotations

import os

import pytest

from altovirt.arch.x86_64 import bootparams as bp
from altovirt.arch.x86_64 import pvh

from .cabi import c_values, check_struct, needs_gcc

BOOTPARAM_H = ("asm/bootparam.h",)
START_INFO_H = ("stdint.h", "xen/xen.h", "xen/arch-x86/hvm/start_info.h")
needs_xen_headers = pytest.mark.skipif(
    not os.path.exists("/usr/include/xen/arch-x86/hvm/start_info.h"),
    reason="SKIPPED LOUDLY: Debian libxen-dev is not installed; hvm_start_info cannot be cross-checked")


@needs_gcc
def test_setup_header() -> None:
    check_struct(BOOTPARAM_H, "struct setup_header", bp.setup_header)


@needs_gcc
def test_boot_params() -> None:
    check_struct(BOOTPARAM_H, "struct boot_params", bp.boot_params)


@needs_gcc
def test_boot_e820_entry_and_constants() -> None:
    check_struct(BOOTPARAM_H, "struct boot_e820_entry", bp.boot_e820_entry)
    names = {"E820_MAX_ENTRIES_ZEROPAGE": bp.E820_MAX_ENTRIES_ZEROPAGE, "XLF_KERNEL_64": bp.XLF_KERNEL_64,
             "XLF_CAN_BE_LOADED_ABOVE_4G": bp.XLF_CAN_BE_LOADED_ABOVE_4G, "LOADED_HIGH": bp.LOADED_HIGH,
             "CAN_USE_HEAP": bp.CAN_USE_HEAP, "SETUP_NONE": 0}
    assert c_values(BOOTPARAM_H, tuple(names)) == names


@needs_gcc
@needs_xen_headers
@pytest.mark.parametrize("c_name, struct", [
    ("struct hvm_start_info", pvh.hvm_start_info),
    ("struct hvm_modlist_entry", pvh.hvm_modlist_entry),
    ("struct hvm_memmap_table_entry", pvh.hvm_memmap_table_entry),
])
def test_pvh_structs(c_name: str, struct: type) -> None:
    check_struct(START_INFO_H, c_name, struct)


@needs_gcc
@needs_xen_headers
def test_pvh_constants() -> None:
    names = {"XEN_HVM_START_MAGIC_VALUE": pvh.XEN_HVM_START_MAGIC_VALUE,
             "XEN_HVM_MEMMAP_TYPE_RAM": pvh.XEN_HVM_MEMMAP_TYPE_RAM,
             "XEN_HVM_MEMMAP_TYPE_RESERVED": pvh.XEN_HVM_MEMMAP_TYPE_RESERVED}
    assert c_values(START_INFO_H, tuple(names)) == names
    assert c_values(("xen/elfnote.h",), ("XEN_ELFNOTE_PHYS32_ENTRY",)) == {
        "XEN_ELFNOTE_PHYS32_ENTRY": pvh.XEN_ELFNOTE_PHYS32_ENTRY}
