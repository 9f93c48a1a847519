/*
 * Entry points of the AltoVirt probe guest.
 *
 * The image is linked at 16 MiB (LOAD_ADDR, the kernel's default physical
 * load address). Each way in sits at its own offset so the probe can report
 * which boot path the loader took:
 *   +0x000  raw binary ("objcopy -O binary"), 64-bit, RSI = boot_params
 *   +0x100  ELF e_entry of probe64.elf (no PVH note), 64-bit, RSI = boot_params
 *   +0x200  bzImage 64-bit entry (boot.rst "64-bit boot protocol"), loaded
 *           wherever the loader chose; we copy ourselves to LOAD_ADDR first
 *   pvh_start  32-bit protected mode, EBX = hvm_start_info (XEN_ELFNOTE_PHYS32_ENTRY)
 *
 * Everything after entry runs on our own identity page tables, GDT and
 * stack, so the probe depends on nothing the loader set up beyond what the
 * boot protocols promise (and, for +0x200, the loader's identity map of the
 * first 1 GiB, which is where we copy to).
 */

#define BOOT_RAW	1
#define BOOT_ELF64	2
#define BOOT_BZIMAGE	3
#define BOOT_PVH	4

#define BOOT_TIMER_PORT	0x3ff

	.section .text.head, "ax"
	.code64
	.globl _start
_start:					/* +0x000: raw */
	movl	$BOOT_RAW, %edi
	jmp	common64

	.org	0x100
	.globl	startup_elf64
startup_elf64:				/* +0x100: ELF e_entry */
	movl	$BOOT_ELF64, %edi
	jmp	common64

	.org	0x200
startup_bz64:				/* +0x200: bzImage */
	cld
	leaq	_start(%rip), %r8		/* where the loader put us */
	movq	$_start, %r9			/* where we are linked */
	movq	%r8, %r12			/* report the load address */
	cmpq	%r8, %r9
	je	1f
	movq	%r8, %rax
	movq	%rsi, %rdx			/* keep boot_params */
	movq	%r8, %rsi
	movq	%r9, %rdi
	movq	$_image_end, %rcx
	subq	%r9, %rcx
	rep movsb
	movq	%rdx, %rsi
1:	movl	$BOOT_BZIMAGE, %edi
	movabsq	$common64_loaded, %rax
	jmp	*%rax

/*
 * common64: EDI = boot path, RSI (or, for PVH, ESI) = boot info pointer.
 * R12 = load address when the entry already computed it.
 */
common64:
	leaq	_start(%rip), %r12
common64_loaded:
	cli
	cld
	movl	%edi, %r14d
	movq	%rsi, %r15
	movw	$BOOT_TIMER_PORT, %dx		/* boot timer: first instruction we own */
	movb	$1, %al
	outb	%al, %dx

	/* raw and bzImage loaders do not know our .bss: clear it ourselves */
	leaq	_bss_start(%rip), %rdi
	leaq	_bss_end(%rip), %rcx
	subq	%rdi, %rcx
	xorl	%eax, %eax
	rep stosb

	/* identity map 0-4 GiB with 2 MiB pages; the top GiB (MMIO) uncached */
	leaq	pml4(%rip), %rdi
	leaq	pdpt(%rip), %rax
	orq	$0x3, %rax
	movq	%rax, (%rdi)
	leaq	pdpt(%rip), %rdi
	leaq	pd(%rip), %rax
	orq	$0x3, %rax
	xorl	%ecx, %ecx
2:	movq	%rax, (%rdi,%rcx,8)
	addq	$0x1000, %rax
	incl	%ecx
	cmpl	$4, %ecx
	jb	2b
	leaq	pd(%rip), %rdi
	xorl	%ecx, %ecx
3:	movq	%rcx, %rax
	shlq	$21, %rax
	orq	$0x83, %rax			/* present, writable, 2 MiB */
	cmpl	$3*512, %ecx
	jb	4f
	orq	$0x18, %rax			/* PWT | PCD for the MMIO gap */
4:	movq	%rax, (%rdi,%rcx,8)
	incl	%ecx
	cmpl	$4*512, %ecx
	jb	3b
	leaq	pml4(%rip), %rax
	movq	%rax, %cr3

	lgdt	gdt_desc(%rip)
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	bsp_stack_top(%rip), %rsp
	pushq	$0x08
	leaq	5f(%rip), %rax
	pushq	%rax
	lretq
5:	movl	%r14d, %edi
	movq	%r15, %rsi
	movq	%r12, %rdx
	call	probe_main
6:	cli
	hlt
	jmp	6b

/* PVH: 32-bit flat protected mode, paging off, EBX = hvm_start_info. */
	.code32
	.globl	pvh_start
pvh_start:
	cli
	cld
	movl	%ebx, %esi
	/* build a minimal 1 GiB identity map to reach long mode; common64 replaces it */
	movl	$pvh_pml4, %edi
	movl	$pvh_pdpt + 3, (%edi)
	movl	$0, 4(%edi)
	movl	$pvh_pdpt, %edi
	movl	$pvh_pd + 3, (%edi)
	movl	$0, 4(%edi)
	movl	$pvh_pd, %edi
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$0x83, %eax
	movl	%eax, (%edi,%ecx,8)
	movl	$0, 4(%edi,%ecx,8)
	incl	%ecx
	cmpl	$512, %ecx
	jb	1b
	movl	$pvh_pml4, %eax
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax		/* PG | PE */
	movl	%eax, %cr0
	lgdt	gdt_desc
	ljmp	$0x08, $pvh_long
	.code64
pvh_long:
	movl	$BOOT_PVH, %edi
	movl	%esi, %esi
	jmp	common64

/*
 * AP trampoline: copied to TRAMPOLINE (a 4 KiB page below 1 MiB) and entered
 * in real mode by a SIPI with vector TRAMPOLINE >> 12. The BSP patches
 * tramp_cr3 and tramp_target before sending it.
 */
#define TRAMPOLINE	0x8000
#define T(x)		((x) - ap_trampoline + TRAMPOLINE)

	.section .rodata.trampoline, "a"
	.globl	ap_trampoline, ap_trampoline_end, tramp_cr3, tramp_target
	.code16
ap_trampoline:
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds
	lgdtl	T(tramp_gdt_desc)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x18, $T(tramp32)
	.code32
tramp32:
	movl	$0x20, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%cr4, %eax
	orl	$0x20, %eax
	movl	%eax, %cr4
	movl	T(tramp_cr3), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000000, %eax
	movl	%eax, %cr0
	ljmp	$0x08, $T(tramp64)
	.code64
tramp64:
	movq	T(tramp_target), %rax
	jmp	*%rax
	.balign	8
tramp_cr3:	.quad 0
tramp_target:	.quad 0
tramp_gdt:
	.quad	0
	.quad	0x00af9a000000ffff		/* 0x08: 64-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: data */
	.quad	0x00cf9a000000ffff		/* 0x18: 32-bit code */
	.quad	0x00cf92000000ffff		/* 0x20: data */
tramp_gdt_desc:
	.word	tramp_gdt_desc - tramp_gdt - 1
	.long	T(tramp_gdt)
ap_trampoline_end:

/* AP 64-bit entry: take a stack slot and enter C. */
	.text
	.code64
	.globl	ap_entry64
ap_entry64:
	lgdt	gdt_desc(%rip)
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	$1, %eax
	lock xaddl %eax, ap_stack_next(%rip)
	movl	%eax, %edi			/* AP ordinal, from 1 */
	shlq	$12, %rax
	leaq	ap_stacks(%rip), %rsp
	addq	%rax, %rsp
	call	ap_main
1:	cli
	hlt
	jmp	1b

	.data
	.balign	8
gdt:
	.quad	0
	.quad	0x00af9a000000ffff		/* 0x08: 64-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: data */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.quad	gdt
ap_stack_next:
	.long	1

/* The PVH tables are live while common64 clears .bss, so they live in .data. */
	.balign	4096
pvh_pml4: .skip	4096
pvh_pdpt: .skip	4096
pvh_pd:	.skip	4096

	.bss
	.balign	4096
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4 * 4096

/*
 * Stacks are not cleared: on PVM every first touch of a guest page costs a
 * shadow-MMU fault (about 2 ms nested), so the probe touches only what it uses.
 */
	.section .stack, "aw", @nobits
	.balign	4096
	.skip	16384
bsp_stack_top:
	.globl	ap_stacks
ap_stacks:	.skip	4096 * 256		/* slot i's stack top is ap_stacks + 4096 * i */

/* PVH entry note (Xen's elfnote.h: XEN_ELFNOTE_PHYS32_ENTRY = 18). */
	.section .note.Xen, "a"
	.balign	4
	.long	4
	.long	4
	.long	18
	.asciz	"Xen"
	.long	pvh_start
