/*
 * arm64 board support for the probe: the PL011 UART, PSCI power-off, the
 * generic timer's rate, and the exception handler that lets the probe survive
 * an access to an address nobody decodes.
 */
#include "../probe.h"

/* PrimeCell UART (PL011) Technical Reference Manual r1p5, 3.2 */
#define UARTDR		0x000
#define UARTFR		0x018
#define UARTLCR_H	0x02c
#define UARTCR		0x030
#define UARTIMSC	0x038
#define FR_RXFE		(1 << 4)
#define FR_TXFF		(1 << 5)
#define LCR_H_FEN	(1 << 4)
#define LCR_H_WLEN_8	(3 << 5)
#define CR_UARTEN	(1 << 0)
#define CR_TXE		(1 << 8)
#define CR_RXE		(1 << 9)

/* ESR_EL1 (Arm ARM D17.2.40) */
#define ESR_EC(esr)	((esr) >> 26 & 0x3f)
#define EC_DABT_CUR	0x25		/* data abort taken without a change in EL */
#define ESR_ISV		(1U << 24)
#define ESR_SAS(esr)	((esr) >> 22 & 3)
#define ESR_SSE		(1U << 21)
#define ESR_SRT(esr)	((esr) >> 16 & 0x1f)
#define ESR_SF		(1U << 15)
#define ESR_FNV		(1U << 10)
#define ESR_WNR		(1U << 6)
#define ESR_DFSC(esr)	((esr) & 0x3f)

/* The contract's address; the device tree's "arm,pl011" replaces it before the first line. */
static u64 uart = 0x09000000;

static void uart_wr(u32 reg, u32 v) { wr32(uart + reg, v); }
static u32 uart_rd(u32 reg) { return rd32(uart + reg); }

void serial_init(void)
{
	if (dt.uart)
		uart = dt.uart;
	/* polled, 8N1 with FIFOs; the baud rate is the VMM's business */
	uart_wr(UARTCR, 0);
	uart_wr(UARTIMSC, 0);
	uart_wr(UARTLCR_H, LCR_H_WLEN_8 | LCR_H_FEN);
	uart_wr(UARTCR, CR_UARTEN | CR_TXE | CR_RXE);
}

static void uart_putc(u8 c)
{
	while (uart_rd(UARTFR) & FR_TXFF)
		cpu_relax();
	uart_wr(UARTDR, c);
}

void serial_write(const char *s, size_t n)
{
	for (; n; n--, s++) {
		if (*s == '\n')
			uart_putc('\r');
		uart_putc((u8)*s);
	}
}

int serial_getc(void)
{
	if (uart_rd(UARTFR) & FR_RXFE)
		return -1;
	return uart_rd(UARTDR) & 0xff;	/* bits 11:8 are error flags */
}

/* SMC Calling Convention (DEN0028) 2.7: x0 the function, x1-x3 its arguments, x0 the result. */
long psci_call(u32 fn, u64 a1, u64 a2, u64 a3)
{
	register u64 x0 __asm__("x0") = fn;
	register u64 x1 __asm__("x1") = a1;
	register u64 x2 __asm__("x2") = a2;
	register u64 x3 __asm__("x3") = a3;

	if (dt.psci == PSCI_METHOD_SMC)
		__asm__ volatile("smc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : :
				 "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15",
				 "x16", "x17", "memory");
	else if (dt.psci == PSCI_METHOD_HVC)
		__asm__ volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : :
				 "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15",
				 "x16", "x17", "memory");
	else
		return -1;	/* PSCI NOT_SUPPORTED */
	return (long)x0;
}

static void halt(void) __attribute__((noreturn));
static void halt(void)
{
	for (;;)
		__asm__ volatile("wfi");
}

/* PSCI 1.1, 5.10: SYSTEM_OFF does not return; without PSCI the CPU just waits. */
void poweroff(void)
{
	psci_call(PSCI_SYSTEM_OFF, 0, 0, 0);
	halt();
}

u64 tsc_hz(void)
{
	return timer_hz();
}

/* The registers head.S saves on every exception. */
struct regs {
	u64 x[31];
	u64 elr, spsr;
};

static const char *const vector_names[] = {
	"sync-sp0", "irq-sp0", "fiq-sp0", "serror-sp0", "sync", "irq", "fiq", "serror",
	"sync-el0-64", "irq-el0-64", "fiq-el0-64", "serror-el0-64",
	"sync-el0-32", "irq-el0-32", "fiq-el0-32", "serror-el0-32",
};

/*
 * The access a data abort interrupted, from the syndrome when it is valid, else
 * from the instruction: a load or store of one general-purpose register without
 * writeback (Arm ARM C4.1.94, "Load/store register (unsigned immediate)",
 * "(unscaled immediate)" and "(register offset)"), which is how rd32()/wr32()
 * and the compiler's plain accesses look. 0, or -1 for anything else.
 */
static int decode_access(u32 esr, u32 insn, u32 *rt, u32 *bytes, int *write, int *sign, int *wide)
{
	if (esr & ESR_ISV) {
		*rt = ESR_SRT(esr);
		*bytes = 1U << ESR_SAS(esr);
		*write = !!(esr & ESR_WNR);
		*sign = !!(esr & ESR_SSE);
		*wide = !!(esr & ESR_SF);
		return 0;
	}
	int uimm = (insn & 0x3b000000) == 0x39000000;
	int unscaled = (insn & 0x3b200c00) == 0x38000000;
	int regoff = (insn & 0x3b200c00) == 0x38200800;
	u32 size = insn >> 30, opc = insn >> 22 & 3;
	if (!(uimm || unscaled || regoff) || insn & (1U << 26) || (size == 3 && opc >= 2))
		return -1;	/* SIMD&FP, or prefetch */
	*rt = insn & 0x1f;
	*bytes = 1U << size;
	*write = opc == 0;
	*sign = opc >= 2;
	*wide = opc == 2 || size == 3;
	return 0;
}

static volatile int fatal;

/* From head.S's vectors: kind is the vector's index in the table (Arm ARM D1.3.1). */
void exception(struct regs *r, u64 kind)
{
	u64 esr = read_sysreg(esr_el1), far = read_sysreg(far_el1);
	u32 rt, bytes;
	int write, sign, wide;

	if (kind == 4 && ESR_EC(esr) == EC_DABT_CUR && !fatal &&
	    !decode_access((u32)esr, *(const volatile u32 *)r->elr, &rt, &bytes, &write, &sign, &wide)) {
		/*
		 * Nobody decodes this address: QEMU answers with an external abort. Skip
		 * the instruction; a load reads all ones, as unclaimed MMIO does on x86.
		 */
		if (!write && rt != 31) {
			u64 ones = bytes == 8 ? ~0UL : (1UL << (8 * bytes)) - 1;
			if (sign)
				ones = ~0UL;
			r->x[rt] = wide ? ones : ones & 0xffffffff;
		}
		r->elr += 4;
		printf("probe: abort %s addr=0x%lx esr=0x%lx dfsc=0x%lx skipped\n", write ? "write" : "read",
		       esr & ESR_FNV ? 0 : far, esr, ESR_DFSC(esr));
		return;
	}
	if (fatal++)
		halt();		/* a fault while reporting one */
	printf("probe: exception %s esr=0x%lx elr=0x%lx far=0x%lx spsr=0x%lx\n",
	       kind < 16 ? vector_names[kind] : "?", esr, r->elr, far, r->spsr);
	printf("probe: done fail\n");
	poweroff();
}
