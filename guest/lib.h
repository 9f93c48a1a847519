/* Freestanding helpers shared by the probe's modules. */
#ifndef PROBE_LIB_H
#define PROBE_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define NULL ((void *)0)

#ifdef __aarch64__
#include "arch/arm64.h"
#else
#include "arch/x86.h"
#endif

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
