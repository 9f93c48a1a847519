/* State shared between the probe's modules. */
#ifndef PROBE_H
#define PROBE_H
#include "lib.h"

#define BOOT_RAW	1
#define BOOT_ELF64	2
#define BOOT_BZIMAGE	3
#define BOOT_PVH	4
#define BOOT_IMAGE	5	/* arm64 Linux Image (Documentation/arch/arm64/booting.rst) */

struct e820_entry {
	u64 addr, size;
	u32 type;
};

struct boot_info {
	u32 path;		/* BOOT_* */
	u64 load;		/* where the loader put the image */
	u32 protocol;		/* boot protocol version, or hvm_start_info version */
	u32 loader;		/* type_of_loader */
	const char *cmdline;
	u64 initrd, initrd_size;
	u64 rsdp;		/* the ACPI RSDP the boot protocol named, or 0 */
	u64 ram;		/* bytes of usable RAM */
	u32 n_e820;
	struct e820_entry e820[128];
};

extern struct boot_info boot;

const char *cmdline_arg(const char *key, size_t *len);
void probe_run(int boot_ok) __attribute__((noreturn));

/* Per architecture (probe.c and smp.c; arch/arm64_boot.c). */
int test_info(void);
int test_smp(void);
#ifdef __x86_64__
void mptable_report(void);
int mptable_valid(void);
int test_keyboard(void);
int test_triplefault(void);
int test_acpi(void);
int test_acpi_power(void);
#endif

/* Everywhere (tests_*.c, blkbench.c). */
int test_rng(void);
int test_fs(void);
int test_rng_rate(void);
int test_blk(void);
int test_virtio_abuse(void);
int test_blkbench(void);
int test_console(void);
int test_net(void);
int test_vsock(void);
int test_netbench(void);
int test_net_big(void);
int test_hotplug(void);
int test_xenstore(void);
int test_snapshot(void);
u64 tsc_hz(void);

#endif
