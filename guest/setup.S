/*
 * The real-mode part of probe.bzImage: a boot sector and one setup sector
 * carrying the setup header (Documentation/arch/x86/boot.rst). Only the
 * 64-bit boot protocol is supported: a loader that runs this code in real
 * mode is told so and halts. PAYLOAD_SIZE and INIT_SIZE come from the
 * Makefile (--defsym), after the protected-mode payload is built.
 */
	.code16
	.section .text
	.globl	_setup_start
_setup_start:
	cli
1:	hlt
	jmp	1b

	.org	0x1f1
setup_sects:	.byte	1			/* sectors after the boot sector */
root_flags:	.word	0
syssize:	.long	(PAYLOAD_SIZE + 15) / 16
ram_size:	.word	0
vid_mode:	.word	0xffff			/* NORMAL_VGA */
root_dev:	.word	0
boot_flag:	.word	0xaa55
		.byte	0xeb, 0x66		/* 0x200: jmp to after the header */
header:		.ascii	"HdrS"
version:	.word	0x020f
realmode_swtch:	.long	0
start_sys_seg:	.word	0x1000
kernel_version:	.word	kernel_version_str - 0x200
type_of_loader:	.byte	0
loadflags:	.byte	0x01			/* LOADED_HIGH */
setup_move_size: .word	0x8000
code32_start:	.long	0x100000
ramdisk_image:	.long	0
ramdisk_size:	.long	0
bootsect_kludge: .long	0
heap_end_ptr:	.word	0
ext_loader_ver:	.byte	0
ext_loader_type: .byte	0
cmd_line_ptr:	.long	0
initrd_addr_max: .long	0x7fffffff
kernel_alignment: .long	0x200000
relocatable_kernel: .byte 1
min_alignment:	.byte	21
xloadflags:	.word	0x0001			/* XLF_KERNEL_64 */
cmdline_size:	.long	2047
hardware_subarch: .long	0
hardware_subarch_data: .quad 0
payload_offset:	.long	0
payload_length:	.long	0
setup_data:	.quad	0
pref_address:	.quad	0x1000000
init_size:	.long	INIT_SIZE
handover_offset: .long	0
kernel_info_offset: .long 0
kernel_version_str:
	.asciz	"altovirt-probe 1.0 (64-bit boot protocol only)"
	.org	1024
