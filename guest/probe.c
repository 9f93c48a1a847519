/*
 * The AltoVirt probe guest: reports what the VMM handed it, in lines of the
 * form "probe: KEY ...", then runs the tests named by probe.run=a,b,... on
 * its command line (run.c) and powers off. This is the x86 side; arm64's is
 * arch/arm64_boot.c.
 *
 * Layouts follow Linux's Documentation/arch/x86/boot.rst and zero-page.rst,
 * Xen's hvm/start_info.h and the Intel MultiProcessor Specification 1.4.
 */
#include "lib.h"
#include "probe.h"

/* boot_params (zero page) offsets */
#define BP_ACPI_RSDP_ADDR	0x070
#define BP_EXT_RAMDISK_IMAGE	0x0c0
#define BP_EXT_RAMDISK_SIZE	0x0c4
#define BP_EXT_CMD_LINE_PTR	0x0c8
#define BP_E820_ENTRIES		0x1e8
#define BP_HDR_MAGIC		0x202
#define BP_HDR_VERSION		0x206
#define BP_TYPE_OF_LOADER	0x210
#define BP_RAMDISK_IMAGE	0x218
#define BP_RAMDISK_SIZE		0x21c
#define BP_CMD_LINE_PTR		0x228
#define BP_E820_TABLE		0x2d0
#define HDRS_MAGIC		0x53726448	/* "HdrS" */

/* hvm_start_info */
#define HVM_START_MAGIC		0x336ec578
#define SI_VERSION		4
#define SI_NR_MODULES		12
#define SI_MODLIST_PADDR	16
#define SI_CMDLINE_PADDR	24
#define SI_RSDP_PADDR		32
#define SI_MEMMAP_PADDR		40
#define SI_MEMMAP_ENTRIES	48

#define BOOT_TIMER_PORT		0x3ff
#define MMIO_GAP_PROBE		0xc0000000UL	/* start of the 32-bit MMIO gap: no device there */
#define MAX_E820		128

static const char *const boot_names[] = { "?", "raw", "elf64", "bzimage", "pvh" };

struct boot_info boot;

static void add_e820(u64 addr, u64 size, u32 type)
{
	if (boot.n_e820 < MAX_E820) {
		boot.e820[boot.n_e820].addr = addr;
		boot.e820[boot.n_e820].size = size;
		boot.e820[boot.n_e820].type = type;
		boot.n_e820++;
	}
}

/* Sort by address and drop empty entries, as Linux's e820__update_table() does. */
static void sanitize_e820(void)
{
	u32 n = 0;

	for (u32 i = 0; i < boot.n_e820; i++)
		if (boot.e820[i].size)
			boot.e820[n++] = boot.e820[i];
	boot.n_e820 = n;
	for (u32 i = 1; i < n; i++)
		for (u32 j = i; j && boot.e820[j - 1].addr > boot.e820[j].addr; j--) {
			struct e820_entry t = boot.e820[j];
			boot.e820[j] = boot.e820[j - 1];
			boot.e820[j - 1] = t;
		}
}

static int parse_zero_page(u64 bp)
{
	if (rd32(bp + BP_HDR_MAGIC) != HDRS_MAGIC) {
		printf("probe: error zero page at 0x%lx has no HdrS\n", bp);
		return -1;
	}
	boot.protocol = rd16(bp + BP_HDR_VERSION);
	boot.loader = rd8(bp + BP_TYPE_OF_LOADER);
	boot.cmdline = (const char *)(rd32(bp + BP_CMD_LINE_PTR) |
				      ((u64)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32));
	boot.initrd = rd32(bp + BP_RAMDISK_IMAGE) | ((u64)rd32(bp + BP_EXT_RAMDISK_IMAGE) << 32);
	boot.initrd_size = rd32(bp + BP_RAMDISK_SIZE) | ((u64)rd32(bp + BP_EXT_RAMDISK_SIZE) << 32);
	boot.rsdp = rd64(bp + BP_ACPI_RSDP_ADDR);
	for (u32 i = 0; i < rd8(bp + BP_E820_ENTRIES); i++) {
		u64 e = bp + BP_E820_TABLE + 20 * i;
		add_e820(rd64(e), rd64(e + 8), rd32(e + 16));
	}
	return 0;
}

static int parse_start_info(u64 si)
{
	if (rd32(si) != HVM_START_MAGIC) {
		printf("probe: error hvm_start_info at 0x%lx has magic 0x%x\n", si, rd32(si));
		return -1;
	}
	boot.protocol = rd32(si + SI_VERSION);
	boot.cmdline = (const char *)rd64(si + SI_CMDLINE_PADDR);
	boot.rsdp = rd64(si + SI_RSDP_PADDR);
	if (rd32(si + SI_NR_MODULES)) {
		u64 mod = rd64(si + SI_MODLIST_PADDR);
		boot.initrd = rd64(mod);
		boot.initrd_size = rd64(mod + 8);
	}
	if (boot.protocol >= 1) {
		u64 map = rd64(si + SI_MEMMAP_PADDR);
		for (u32 i = 0; i < rd32(si + SI_MEMMAP_ENTRIES); i++)
			add_e820(rd64(map + 24 * i), rd64(map + 24 * i + 8), rd32(map + 24 * i + 16));
	}
	return 0;
}

static void report_boot(void)
{
	u64 ram = 0;

	printf("probe: boot=%s load=0x%lx\n", boot_names[boot.path], boot.load);
	printf("probe: protocol=0x%x loader=0x%x\n", boot.protocol, boot.loader);
	printf("probe: cmdline=%s\n", boot.cmdline ? boot.cmdline : "");
	for (u32 i = 0; i < boot.n_e820; i++) {
		printf("probe: e820 0x%lx 0x%lx %u\n", boot.e820[i].addr, boot.e820[i].size,
		       boot.e820[i].type);
		if (boot.e820[i].type == 1)
			ram += boot.e820[i].size;
	}
	boot.ram = ram;
	printf("probe: ram=%lu\n", ram);
	mptable_report();
	/* An access nobody decodes: the VMM sees an MMIO exit and must survive it. */
	wr32(MMIO_GAP_PROBE, 0x12345678);
	printf("probe: mmio-gap read=0x%x\n", rd32(MMIO_GAP_PROBE));
	if (boot.initrd_size)
		printf("probe: initrd addr=0x%lx size=%lu crc32=0x%x\n", boot.initrd, boot.initrd_size,
		       crc32((const u8 *)boot.initrd, boot.initrd_size));
	else
		printf("probe: initrd none\n");
}

/* info: what the loader handed over must be self-consistent. */
int test_info(void)
{
	int ok = 1;

	for (u32 i = 0; i < boot.n_e820; i++) {
		u64 end = boot.e820[i].addr + boot.e820[i].size;
		if (i + 1 < boot.n_e820 && end > boot.e820[i + 1].addr) {
			printf("probe: info e820 entry %u overlaps the next\n", i);
			ok = 0;
		}
	}
	if (boot.ram == 0) {
		printf("probe: info no usable RAM in the memory map\n");
		ok = 0;
	}
	if (!mptable_valid()) {
		printf("probe: info MP table missing or bad checksum\n");
		ok = 0;
	}
	return ok;
}

/*
 * keyboard: wait for Ctrl-Alt-Del from the i8042 (QMP system_powerdown) and
 * then power off, as a guest that honours the three-finger salute would.
 */
int test_keyboard(void)
{
	static const u8 cad[] = { 0x14, 0x11, 0xe0, 0x71 };	/* scan code set 2 */
	size_t matched = 0;

	printf("probe: keyboard waiting\n");
	while (matched < sizeof(cad)) {
		if (!(inb(0x64) & 1)) {
			cpu_relax();
			continue;
		}
		u8 b = inb(0x60);
		matched = b == cad[matched] ? matched + 1 : (b == cad[0] ? 1 : 0);
	}
	printf("probe: ctrl-alt-del\n");
	return 1;
}

/*
 * triplefault: a CPU exception with no IDT escalates to a shutdown. ud2 rather
 * than int3: PVM emulates software interrupts and reports a failure instead.
 */
int test_triplefault(void)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) idt = { 0, 0 };

	printf("probe: triple fault now\n");
	__asm__ volatile("lidt %0; ud2" : : "m"(idt));
	return 0;
}

void probe_main(u32 path, u64 info, u64 load)
{
	int ok;

	boot.path = path;
	boot.load = load;
	serial_init();
	ok = (path == BOOT_PVH ? parse_start_info(info) : parse_zero_page(info)) == 0;
	if (ok) {
		sanitize_e820();
		report_boot();
	}
	outb(BOOT_TIMER_PORT, 2);
	printf("probe: boottimer 1 2\n");

	probe_run(ok);
}
