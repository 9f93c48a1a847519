/*
 * arm64 primitives for the probe: system registers, the generic timer, PSCI and
 * MMIO accessors. Included by lib.h.
 *
 * The probe runs at EL1 with the MMU off, so every data access is Device-nGnRnE
 * (Arm ARM D8.2.12): it is built with -mstrict-align, and MMIO goes through
 * single LDR/STR instructions without writeback, the only form whose syndrome a
 * hypervisor can decode (ESR_ELx.ISV, Arm ARM D17.2.40).
 */
#ifndef PROBE_ARCH_ARM64_H
#define PROBE_ARCH_ARM64_H

#define RAM_BASE	0x40000000UL	/* QEMU virt and AltoVirt's arm64 machine */
#define TIMEOUT	(20UL * timer_hz())	/* generic timer ticks: 20 seconds */

#define read_sysreg(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#define write_sysreg(r, v) __asm__ volatile("msr " #r ", %0" : : "r"((u64)(v)))

static inline void cpu_relax(void) { __asm__ volatile("yield" ::: "memory"); }

/* The virtual count (CNTVCT_EL0) and its frequency (CNTFRQ_EL0), Arm ARM D11.1. */
static inline u64 rdtsc(void)
{
	u64 v;
	__asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v) : : "memory");
	return v;
}
static inline u64 timer_hz(void) { return read_sysreg(cntfrq_el0) & 0xffffffff; }

/* As Linux's readl()/writel(): a barrier orders them against DMA buffers in RAM. */
static inline u8 rd8(u64 a)
{
	u32 v;
	__asm__ volatile("ldrb %w0, [%1]; dmb oshld" : "=r"(v) : "r"(a) : "memory");
	return (u8)v;
}
static inline u16 rd16(u64 a)
{
	u32 v;
	__asm__ volatile("ldrh %w0, [%1]; dmb oshld" : "=r"(v) : "r"(a) : "memory");
	return (u16)v;
}
static inline u32 rd32(u64 a)
{
	u32 v;
	__asm__ volatile("ldr %w0, [%1]; dmb oshld" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline u64 rd64(u64 a)
{
	u64 v;
	__asm__ volatile("ldr %0, [%1]; dmb oshld" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline void wr32(u64 a, u32 v)
{
	__asm__ volatile("dmb oshst; str %w0, [%1]" : : "rZ"(v), "r"(a) : "memory");
}

/* PSCI 1.1 (DEN0022), 5.1: function IDs; SMC Calling Convention (DEN0028) 2.7. */
#define PSCI_VERSION		0x84000000
#define PSCI_CPU_ON		0xc4000003	/* SMC64 */
#define PSCI_SYSTEM_OFF		0x84000008
#define PSCI_SYSTEM_RESET	0x84000009
#define PSCI_METHOD_NONE	0
#define PSCI_METHOD_HVC		1
#define PSCI_METHOD_SMC		2
long psci_call(u32 fn, u64 a1, u64 a2, u64 a3);

/* What the device tree describes (arch/arm64_boot.c fills it in before anything else). */
#define DT_MAX_MEM	16
#define DT_MAX_CPUS	256
#define DT_MAX_VIRTIO	64

struct dt_info {
	u64 addr, size;			/* the blob */
	u32 n_mem;
	struct { u64 base, size; } mem[DT_MAX_MEM];
	u32 n_cpus;
	u64 mpidr[DT_MAX_CPUS];		/* the cpu nodes' "reg": MPIDR_EL1 affinity fields */
	u32 psci;			/* PSCI_METHOD_* from /psci "method" */
	int have_bootargs;
	u64 uart;			/* the first "arm,pl011" */
	u64 vmgenid;			/* "microsoft,vmgenid", or 0 */
	u32 n_virtio;
	struct { u64 base; u32 irq; } virtio[DT_MAX_VIRTIO];	/* irq: the GIC INTID */
};

extern struct dt_info dt;

#endif
