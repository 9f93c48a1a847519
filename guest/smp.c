/*
 * MP table discovery (Intel MultiProcessor Specification 1.4, chapter 4)
 * and the smp test: wake every AP with INIT-SIPI-SIPI and let each report.
 */
#include "probe.h"

#define MPF_SIGNATURE	0x5f504d5f	/* "_MP_" */
#define MPC_SIGNATURE	0x504d4350	/* "PCMP" */
#define MP_PROCESSOR	0
#define MP_BUS		1
#define MP_IOAPIC	2
#define MP_INTSRC	3
#define MP_LINTSRC	4
#define CPU_ENABLED	1
#define CPU_BSP		2

#define APIC_DEFAULT_BASE	0xfee00000
#define APIC_ID		0x20
#define APIC_SVR	0xf0
#define APIC_ICR_LOW	0x300
#define APIC_ICR_HIGH	0x310
#define ICR_INIT	0x00004500	/* INIT, level assert */
#define ICR_SIPI	0x00004600	/* start-up */
#define ICR_BUSY	0x00001000
#define TRAMPOLINE	0x8000

struct mp_info {
	u64 mpf, mpc;
	u32 entries;
	int checksums_ok;
	u32 cpus, bsp, lapic;
	u8 apic_ids[256];
	u32 ioapics, ioapic_addr, intsrcs, lintsrcs;
};

static struct mp_info mp;
static int mp_scanned;

static u8 sum(u64 p, u32 n)
{
	u8 s = 0;
	while (n--)
		s += rd8(p++);
	return s;
}

static u64 scan(u64 start, u64 len)
{
	for (u64 p = start; p < start + len; p += 16)
		if (rd32(p) == MPF_SIGNATURE && rd8(p + 8) == 1 && sum(p, 16) == 0)
			return p;
	return 0;
}

/* Where Linux's smp_scan_config() looks, in the same order. */
static void mp_scan(void)
{
	u64 ebda = (u64)rd16(0x40e) << 4;

	if (mp_scanned)
		return;
	mp_scanned = 1;
	mp.mpf = scan(0, 0x400);
	if (!mp.mpf)
		mp.mpf = scan(639 * 0x400, 0x400);
	if (!mp.mpf)
		mp.mpf = scan(0xf0000, 0x10000);
	if (!mp.mpf && ebda)
		mp.mpf = scan(ebda, 0x400);
	if (!mp.mpf)
		return;
	mp.mpc = rd32(mp.mpf + 4);
	if (!mp.mpc || rd32(mp.mpc) != MPC_SIGNATURE)
		return;

	u32 len = rd16(mp.mpc + 4), count = rd16(mp.mpc + 34);

	mp.entries = count;
	mp.checksums_ok = sum(mp.mpc, len) == 0 && rd8(mp.mpc + 6) == 4;
	mp.lapic = rd32(mp.mpc + 36);
	u64 e = mp.mpc + 44;
	for (u32 i = 0; i < count && e < mp.mpc + len; i++) {
		switch (rd8(e)) {
		case MP_PROCESSOR:
			if (rd8(e + 3) & CPU_ENABLED) {
				if (rd8(e + 3) & CPU_BSP)
					mp.bsp = rd8(e + 1);
				if (mp.cpus < 256)
					mp.apic_ids[mp.cpus] = rd8(e + 1);
				mp.cpus++;
			}
			e += 20;
			break;
		case MP_IOAPIC:
			mp.ioapics++;
			mp.ioapic_addr = rd32(e + 4);
			e += 8;
			break;
		case MP_INTSRC:
			mp.intsrcs++;
			e += 8;
			break;
		case MP_LINTSRC:
			mp.lintsrcs++;
			e += 8;
			break;
		default:
			e += 8;
			break;
		}
	}
}

void mptable_report(void)
{
	mp_scan();
	if (!mp.mpc) {
		printf("probe: mptable none\n");
		return;
	}
	printf("probe: mptable addr=0x%lx entries=%u cpus=%u bsp=%u lapic=0x%x ioapics=%u ioapic=0x%x "
	       "intsrc=%u lintsrc=%u checksum=%s\n", mp.mpf, mp.entries, mp.cpus, mp.bsp, mp.lapic, mp.ioapics,
	       mp.ioapic_addr, mp.intsrcs, mp.lintsrcs, mp.checksums_ok ? "ok" : "bad");
}

int mptable_valid(void)
{
	mp_scan();
	return mp.mpc && mp.checksums_ok;
}

static volatile u32 aps_up;
extern const char ap_trampoline[], ap_trampoline_end[];
extern u64 tramp_cr3, tramp_target;
extern void ap_entry64(void);

static u32 apic_id(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}

void ap_main(u32 ordinal)
{
	lock_output();
	printf("probe: ap %u apic=%u up\n", ordinal, apic_id());
	unlock_output();
	__atomic_add_fetch(&aps_up, 1, __ATOMIC_SEQ_CST);
}

static void apic_write(u32 reg, u32 v)
{
	wr32(APIC_DEFAULT_BASE + reg, v);
}

static void ipi(u32 apic, u32 icr)
{
	apic_write(APIC_ICR_HIGH, apic << 24);
	apic_write(APIC_ICR_LOW, icr);
	while (rd32(APIC_DEFAULT_BASE + APIC_ICR_LOW) & ICR_BUSY)
		cpu_relax();
}

static void delay(u64 cycles)
{
	u64 t = rdtsc();
	while (rdtsc() - t < cycles)
		cpu_relax();
}

/*
 * Expected CPU count: the MP table's processors, else (qboot's MP table lists
 * none) CPUID leaf 0xB's logical processors per package.
 */
static u32 expected_cpus(void)
{
	u32 a, b, c, d;

	if (mp.cpus)
		return mp.cpus;
	cpuid(0, 0, &a, &b, &c, &d);
	if (a >= 0xb) {
		cpuid(0xb, 1, &a, &b, &c, &d);
		if (b & 0xffff)
			return b & 0xffff;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	return (b >> 16) & 0xff ? (b >> 16) & 0xff : 1;
}

int test_smp(void)
{
	u64 cr3, t0;
	u32 want, bsp = apic_id();

	mp_scan();
	want = expected_cpus();
	memcpy((void *)TRAMPOLINE, ap_trampoline, ap_trampoline_end - ap_trampoline);
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	*(volatile u64 *)(TRAMPOLINE + ((u64)&tramp_cr3 - (u64)ap_trampoline)) = cr3;
	*(volatile u64 *)(TRAMPOLINE + ((u64)&tramp_target - (u64)ap_trampoline)) = (u64)ap_entry64;

	apic_write(APIC_SVR, 0x1ff);	/* software-enable the BSP's LAPIC */
	for (u32 i = 0; i < want; i++) {
		u32 id = mp.cpus ? mp.apic_ids[i] : i;
		if (id == bsp)
			continue;
		ipi(id, ICR_INIT);
		delay(100000);
		ipi(id, ICR_SIPI | (TRAMPOLINE >> 12));
		delay(20000);
		ipi(id, ICR_SIPI | (TRAMPOLINE >> 12));
	}
	/* real mode is emulated on some hosts: allow APs many seconds to arrive */
	t0 = rdtsc();
	while (aps_up + 1 < want && rdtsc() - t0 < 30000000000UL)
		cpu_relax();
	lock_output();
	printf("probe: smp cpus=%u expected=%u bsp=%u\n", aps_up + 1, want, bsp);
	unlock_output();
	return aps_up + 1 == want;
}
