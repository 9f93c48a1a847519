/*
 * x86 board support for the probe: the 8250 UART on COM1, power-off, and the
 * TSC's rate from kvmclock.
 */
#include "../probe.h"

#define COM1		0x3f8
#define UART_LSR	5
#define LSR_DR		0x01
#define LSR_THRE	0x20
#define UART_FIFO_SIZE	16	/* 16550A: THRE set means the 16-byte FIFO is empty */

#define ISA_DEBUG_EXIT	0xf4	/* QEMU's isa-debug-exit, ignored elsewhere */
#define I8042_COMMAND	0x64
#define I8042_RESET	0xfe

void serial_init(void)
{
	outb(COM1 + 1, 0x00);		/* no interrupts: we poll */
	outb(COM1 + 3, 0x80);		/* DLAB */
	outb(COM1 + 0, 0x01);		/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);		/* 8N1 */
	outb(COM1 + 2, 0x07);		/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);		/* DTR | RTS */
}

void serial_write(const char *s, size_t n)
{
	while (n) {
		while (!(inb(COM1 + UART_LSR) & LSR_THRE))
			cpu_relax();
		for (int i = 0; i < UART_FIFO_SIZE && n; i++, n--) {
			if (*s == '\n') {
				/* keep room for the CR+LF pair in this FIFO load */
				if (i == UART_FIFO_SIZE - 1)
					break;
				outb(COM1, '\r');
				i++;
			}
			outb(COM1, (u8)*s++);
		}
	}
}

int serial_getc(void)
{
	if (!(inb(COM1 + UART_LSR) & LSR_DR))
		return -1;
	return inb(COM1);
}

void poweroff(void)
{
	outb(ISA_DEBUG_EXIT, 0);		/* QEMU: exits with status 1 */
	outb(I8042_COMMAND, I8042_RESET);	/* AltoVirt, Firecracker: reboot=k */
	for (;;)
		__asm__ volatile("cli; hlt");
}

#define MSR_KVM_SYSTEM_TIME_NEW	0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2	3

struct pvclock {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags, pad[2];
} __attribute__((packed));

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* TSC ticks per second from kvmclock; 0 if the hypervisor offers none. */
u64 tsc_hz(void)
{
	static struct pvclock pvc __attribute__((aligned(64)));
	u32 a, b, c, d;

	cpuid(0x40000001, 0, &a, &b, &c, &d);
	if (!(a >> KVM_FEATURE_CLOCKSOURCE2 & 1))
		return 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvc | 1);
	while (pvc.version & 1 || !pvc.tsc_to_system_mul)
		cpu_relax();
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
	/* ns = (ticks << shift) * mul >> 32, so ticks per second = 1e9 << 32 / (mul << shift) */
	u64 num = 1000000000UL << 32 >> (pvc.tsc_shift > 0 ? pvc.tsc_shift : 0);
	u64 hz = num / pvc.tsc_to_system_mul;
	return pvc.tsc_shift < 0 ? hz << -pvc.tsc_shift : hz;
}
