/* Freestanding helpers shared by the probe's modules. */
#ifndef PROBE_LIB_H
#define PROBE_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define NULL ((void *)0)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

void serial_init(void);
void serial_write(const char *s, size_t n);
int serial_getc(void);		/* -1 when nothing is waiting */
size_t serial_getline(char *line, size_t size);	/* waits for a non-empty line, without its end */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void lock_output(void);
void unlock_output(void);

u32 crc32(const u8 *p, size_t n);
u32 crc32_update(u32 crc, u8 byte);	/* start with ~0, finish with ^ ~0 */
void poweroff(void) __attribute__((noreturn));

#endif
