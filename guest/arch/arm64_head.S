/*
 * Entry points of the AltoVirt probe guest on arm64.
 *
 * The image is a Linux arm64 Image (Documentation/arch/arm64/booting.rst):
 * the 64-byte header below, then code. The loader places it at a 2 MiB
 * aligned base + text_offset (0x80000: RAM base 0x40000000 + text_offset is
 * where it is linked) and enters it at the first byte, at EL2 or EL1, MMU off,
 * interrupts masked, x0 = the physical address of the device tree blob.
 * Loaded anywhere else, the probe copies itself to where it is linked first,
 * as the x86 bzImage entry does.
 *
 * Secondary CPUs come in at secondary_entry through PSCI CPU_ON (PSCI 1.1,
 * 5.6), at the caller's EL, MMU off, x0 = the context ID: their ordinal.
 */

#define BOOT_TIMER_MMIO	0x090c0000	/* x86's port 0x3ff */

/* booting.rst, "Call the kernel image": flags */
#define IMAGE_FLAGS_LE		(0 << 0)
#define IMAGE_FLAGS_4K		(1 << 1)
#define IMAGE_FLAGS_BASE_ANY	(0 << 3)	/* 2 MiB aligned base as low in RAM as possible */

#define HCR_EL2_RW		(1 << 31)	/* Arm ARM D17.2.48: EL1 is AArch64 */
#define CNTHCTL_EL2_EL1PCEN	(1 << 1)	/* D17.2.29: EL1 may use the physical timer and counter */
#define CNTHCTL_EL2_EL1PCTEN	(1 << 0)
#define SCTLR_EL1_RES1		0x30d00800	/* D17.2.118: bits 29, 28, 23, 22, 20 and 11; MMU and caches off */
#define SPSR_EL1H_MASKED	0x3c5		/* D17.2.124: EL1h, D, A, I and F masked */

#define FRAME_SIZE		(17 * 16)	/* x0-x30, elr, spsr: struct regs in arch/arm64.c */

	.section .text.head, "ax"
	.globl	_start
_start:
	b	primary_entry			/* code0 */
	.long	0				/* code1 */
	.quad	0x80000				/* text_offset */
	.quad	_image_size			/* image_size: to the end of .bss and the stacks */
	.quad	IMAGE_FLAGS_LE | IMAGE_FLAGS_4K | IMAGE_FLAGS_BASE_ANY
	.quad	0				/* res2 */
	.quad	0				/* res3 */
	.quad	0				/* res4 */
	.ascii	"ARM\x64"			/* magic */
	.long	0				/* res5 */

primary_entry:
	msr	daifset, #0xf
	mov	x19, x0				/* the device tree */
	mrs	x0, CurrentEL
	cmp	x0, #(2 << 2)
	b.ne	1f
	/* EL2 without a hypervisor to run: drop to EL1 (booting.rst allows either) */
	mov	x0, #HCR_EL2_RW
	msr	hcr_el2, x0
	mov	x0, #(CNTHCTL_EL2_EL1PCEN | CNTHCTL_EL2_EL1PCTEN)
	msr	cnthctl_el2, x0
	msr	cntvoff_el2, xzr
	ldr	x0, =SCTLR_EL1_RES1
	msr	sctlr_el1, x0
	mov	x0, #SPSR_EL1H_MASKED
	msr	spsr_el2, x0
	adr	x0, 1f
	msr	elr_el2, x0
	eret
1:	adr	x20, _start			/* where the loader put us */
	ldr	x21, =_start			/* where we are linked */
	cmp	x20, x21
	b.eq	3f
	/* copy [x20, x20 + image) to x21, backwards if the ranges overlap that way */
	ldr	x2, =_image_end
	sub	x2, x2, x21			/* bytes, a multiple of 16 */
	cmp	x21, x20
	b.hi	4f
	mov	x3, #0
2:	ldr	x4, [x20, x3]
	str	x4, [x21, x3]
	add	x3, x3, #8
	cmp	x3, x2
	b.lo	2b
	b	5f
4:	sub	x2, x2, #8
	ldr	x4, [x20, x2]
	str	x4, [x21, x2]
	cbnz	x2, 4b
5:	dsb	sy
	ic	iallu				/* the copy was made with data accesses */
	dsb	sy
	isb
	ldr	x0, =3f
	br	x0
3:	msr	spsel, #1
	ldr	x0, =bsp_stack_top
	mov	sp, x0
	ldr	x0, =vectors
	msr	vbar_el1, x0
	isb

	/* the loader does not know our .bss: clear it ourselves */
	ldr	x0, =_bss_start
	ldr	x1, =_bss_end
6:	cmp	x0, x1
	b.hs	7f
	str	xzr, [x0], #8
	b	6b

7:	mov	w0, #1				/* boot timer: from here on the probe can report */
	ldr	x1, =BOOT_TIMER_MMIO
	str	w0, [x1]

	mov	x0, x19
	mov	x1, x20
	bl	probe_main
8:	wfi
	b	8b

/* PSCI CPU_ON's entry: x0 = the ordinal (from 1), used as the stack slot. */
	.globl	secondary_entry
secondary_entry:
	msr	daifset, #0xf
	msr	spsel, #1
	ldr	x1, =ap_stacks
	add	x1, x1, x0, lsl #12
	mov	sp, x1
	ldr	x1, =vectors
	msr	vbar_el1, x1
	isb
	bl	ap_main
1:	wfi
	b	1b

/*
 * The exception vectors (Arm ARM D1.3.1): 16 entries of 0x80 bytes, each saving
 * x0/x1 and passing its index to exception() in arch/arm64.c, which may change
 * the saved registers (to skip an aborted access) before we return.
 */
	.macro	ventry kind
	.balign	0x80
	sub	sp, sp, #FRAME_SIZE
	stp	x0, x1, [sp, #16 * 0]
	mov	x1, #\kind
	b	exception_entry
	.endm

	.text
	.balign	0x800
vectors:
	ventry	0
	ventry	1
	ventry	2
	ventry	3
	ventry	4
	ventry	5
	ventry	6
	ventry	7
	ventry	8
	ventry	9
	ventry	10
	ventry	11
	ventry	12
	ventry	13
	ventry	14
	ventry	15

exception_entry:
	stp	x2, x3, [sp, #16 * 1]
	stp	x4, x5, [sp, #16 * 2]
	stp	x6, x7, [sp, #16 * 3]
	stp	x8, x9, [sp, #16 * 4]
	stp	x10, x11, [sp, #16 * 5]
	stp	x12, x13, [sp, #16 * 6]
	stp	x14, x15, [sp, #16 * 7]
	stp	x16, x17, [sp, #16 * 8]
	stp	x18, x19, [sp, #16 * 9]
	stp	x20, x21, [sp, #16 * 10]
	stp	x22, x23, [sp, #16 * 11]
	stp	x24, x25, [sp, #16 * 12]
	stp	x26, x27, [sp, #16 * 13]
	stp	x28, x29, [sp, #16 * 14]
	mrs	x2, elr_el1
	stp	x30, x2, [sp, #16 * 15]
	mrs	x2, spsr_el1
	str	x2, [sp, #16 * 16]
	mov	x0, sp
	bl	exception
	ldr	x2, [sp, #16 * 16]
	msr	spsr_el1, x2
	ldp	x30, x2, [sp, #16 * 15]
	msr	elr_el1, x2
	ldp	x0, x1, [sp, #16 * 0]
	ldp	x2, x3, [sp, #16 * 1]
	ldp	x4, x5, [sp, #16 * 2]
	ldp	x6, x7, [sp, #16 * 3]
	ldp	x8, x9, [sp, #16 * 4]
	ldp	x10, x11, [sp, #16 * 5]
	ldp	x12, x13, [sp, #16 * 6]
	ldp	x14, x15, [sp, #16 * 7]
	ldp	x16, x17, [sp, #16 * 8]
	ldp	x18, x19, [sp, #16 * 9]
	ldp	x20, x21, [sp, #16 * 10]
	ldp	x22, x23, [sp, #16 * 11]
	ldp	x24, x25, [sp, #16 * 12]
	ldp	x26, x27, [sp, #16 * 13]
	ldp	x28, x29, [sp, #16 * 14]
	add	sp, sp, #FRAME_SIZE
	eret

/*
 * Stacks are not cleared (as on x86): the probe touches only what it uses.
 * Slot i's stack top, for the CPU of ordinal i, is ap_stacks + 4096 * i.
 */
	.section .stack, "aw", @nobits
	.balign	4096
	.skip	16384
bsp_stack_top:
	.globl	ap_stacks
ap_stacks:	.skip	4096 * 256
