"""The Linux zero page: ``struct boot_params`` and ``struct setup_header``.

Mirrors arch/x86/include/uapi/asm/bootparam.h (packed, offsets in comments);
``tests/test_layouts.py`` compiles that header and compares every offset.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64

# setup_header constants (Documentation/arch/x86/boot.rst)
SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = 0x53726448          # "HdrS"
BOOT_FLAG_MAGIC = 0xAA55
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
# type_of_loader 0xFF: "undefined" boot loader, what Firecracker and StratoVirt use.
LOADER_TYPE_UNDEFINED = 0xFF
E820_MAX_ENTRIES_ZEROPAGE = 128


class setup_header(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16),
        ("vid_mode", u16), ("root_dev", u16), ("boot_flag", u16), ("jump", u16),
        ("header", u32), ("version", u16), ("realmode_swtch", u32),
        ("start_sys_seg", u16), ("kernel_version", u16), ("type_of_loader", u8),
        ("loadflags", u8), ("setup_move_size", u16), ("code32_start", u32),
        ("ramdisk_image", u32), ("ramdisk_size", u32), ("bootsect_kludge", u32),
        ("heap_end_ptr", u16), ("ext_loader_ver", u8), ("ext_loader_type", u8),
        ("cmd_line_ptr", u32), ("initrd_addr_max", u32), ("kernel_alignment", u32),
        ("relocatable_kernel", u8), ("min_alignment", u8), ("xloadflags", u16),
        ("cmdline_size", u32), ("hardware_subarch", u32), ("hardware_subarch_data", u64),
        ("payload_offset", u32), ("payload_length", u32), ("setup_data", u64),
        ("pref_address", u64), ("init_size", u32), ("handover_offset", u32),
        ("kernel_info_offset", u32),
    ]


class boot_e820_entry(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class boot_params(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("screen_info", u8 * 0x40),                 # 0x000
        ("apm_bios_info", u8 * 0x14),               # 0x040
        ("_pad2", u8 * 4),                          # 0x054
        ("tboot_addr", u64),                        # 0x058
        ("ist_info", u8 * 0x10),                    # 0x060
        ("acpi_rsdp_addr", u64),                    # 0x070
        ("_pad3", u8 * 8),                          # 0x078
        ("hd0_info", u8 * 16),                      # 0x080
        ("hd1_info", u8 * 16),                      # 0x090
        ("sys_desc_table", u8 * 0x10),              # 0x0a0
        ("olpc_ofw_header", u8 * 0x10),             # 0x0b0
        ("ext_ramdisk_image", u32),                 # 0x0c0
        ("ext_ramdisk_size", u32),                  # 0x0c4
        ("ext_cmd_line_ptr", u32),                  # 0x0c8
        ("_pad4", u8 * 112),                        # 0x0cc
        ("cc_blob_address", u32),                   # 0x13c
        ("edid_info", u8 * 0x80),                   # 0x140
        ("efi_info", u8 * 0x20),                    # 0x1c0
        ("alt_mem_k", u32),                         # 0x1e0
        ("scratch", u32),                           # 0x1e4
        ("e820_entries", u8),                       # 0x1e8
        ("eddbuf_entries", u8),                     # 0x1e9
        ("edd_mbr_sig_buf_entries", u8),            # 0x1ea
        ("kbd_status", u8),                         # 0x1eb
        ("secure_boot", u8),                        # 0x1ec
        ("_pad5", u8 * 2),                          # 0x1ed
        ("sentinel", u8),                           # 0x1ef
        ("_pad6", u8 * 1),                          # 0x1f0
        ("hdr", setup_header),                      # 0x1f1
        ("_pad7", u8 * (0x290 - 0x1F1 - 0x7B)),
        ("edd_mbr_sig_buffer", u32 * 16),           # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", u8 * 48),                         # 0xcd0
        ("eddbuf", u8 * (6 * 82)),                  # 0xd00
        ("_pad9", u8 * 276),                        # 0xeec
    ]


assert C.sizeof(setup_header) == 0x7B
assert C.sizeof(boot_params) == 4096
