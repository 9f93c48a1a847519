"""PVH boot structures: Xen's public/arch-x86/hvm/start_info.h.

A PVH kernel is an ELF whose XEN_ELFNOTE_PHYS32_ENTRY note names a 32-bit
entry point, entered in flat protected mode with paging off and EBX pointing
at a ``struct hvm_start_info``. ``tests/test_layouts.py`` compares these
structures with Xen's header.
"""

from __future__ import annotations

import ctypes as C

u32, u64 = C.c_uint32, C.c_uint64

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18
# Version 1 adds the memory map (memmap_paddr, memmap_entries).
HVM_START_INFO_VERSION = 1

XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2


class hvm_start_info(C.LittleEndianStructure):
    _fields_ = [
        ("magic", u32), ("version", u32), ("flags", u32), ("nr_modules", u32),
        ("modlist_paddr", u64), ("cmdline_paddr", u64), ("rsdp_paddr", u64),
        ("memmap_paddr", u64), ("memmap_entries", u32), ("reserved", u32),
    ]


class hvm_modlist_entry(C.LittleEndianStructure):
    _fields_ = [("paddr", u64), ("size", u64), ("cmdline_paddr", u64), ("reserved", u64)]


class hvm_memmap_table_entry(C.LittleEndianStructure):
    _fields_ = [("addr", u64), ("size", u64), ("type", u32), ("reserved", u32)]
