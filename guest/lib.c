/* Strings, formatted output and CRC32 for the probe; the UART and power-off are per arch (arch/). */
#include <stdarg.h>
#include "lib.h"

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memset(void *d, int c, size_t n)
{
	u8 *dp = d;
	while (n--)
		*dp++ = (u8)c;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

size_t serial_getline(char *line, size_t size)
{
	size_t n = 0;

	for (;;) {
		int c = serial_getc();
		if (c < 0) {
			cpu_relax();
			continue;
		}
		if (c == '\r' || c == '\n') {
			if (n)
				break;
			continue;	/* the other half of a CR LF */
		}
		if (n < size - 1)
			line[n++] = (char)c;
	}
	line[n] = 0;
	return n;
}

static volatile int output_lock;

void lock_output(void)
{
	while (__atomic_exchange_n(&output_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
}

void unlock_output(void)
{
	__atomic_store_n(&output_lock, 0, __ATOMIC_RELEASE);
}

static char *fmt_num(char *end, u64 v, unsigned base)
{
	*--end = 0;
	do {
		*--end = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	return end;
}

/* printf for %s %c %d %u %x %lu %lx %ld %%, as one serial write per call. */
void printf(const char *fmt, ...)
{
	char out[512], num[24];
	size_t n = 0;
	va_list ap;

	va_start(ap, fmt);
	for (; *fmt && n < sizeof(out) - 1; fmt++) {
		const char *s;
		int lng = 0;

		if (*fmt != '%') {
			out[n++] = *fmt;
			continue;
		}
		fmt++;
		while (*fmt == 'l') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's':
			s = va_arg(ap, const char *);
			break;
		case 'c':
			num[0] = (char)va_arg(ap, int);
			num[1] = 0;
			s = num;
			break;
		case 'd': {
			long v = lng ? va_arg(ap, long) : va_arg(ap, int);
			s = fmt_num(num + sizeof(num), v < 0 ? -(u64)v : (u64)v, 10);
			if (v < 0)
				*(char *)--s = '-';
			break;
		}
		case 'u':
			s = fmt_num(num + sizeof(num), lng ? va_arg(ap, u64) : va_arg(ap, u32), 10);
			break;
		case 'x':
			s = fmt_num(num + sizeof(num), lng ? va_arg(ap, u64) : va_arg(ap, u32), 16);
			break;
		default:
			s = "%";
			break;
		}
		while (*s && n < sizeof(out) - 1)
			out[n++] = *s++;
	}
	va_end(ap);
	serial_write(out, n);
}

static u32 crc_table[256];

u32 crc32_update(u32 crc, u8 byte)
{
	if (!crc_table[1]) {
		for (u32 i = 0; i < 256; i++) {
			u32 c = i;
			for (int k = 0; k < 8; k++)
				c = (c & 1) ? 0xedb88320 ^ (c >> 1) : c >> 1;
			crc_table[i] = c;
		}
	}
	return crc_table[(crc ^ byte) & 0xff] ^ (crc >> 8);
}

u32 crc32(const u8 *p, size_t n)
{
	u32 crc = 0xffffffff;

	while (n--)
		crc = crc32_update(crc, *p++);
	return crc ^ 0xffffffff;
}
