/*
 * snapshot: a guest to save, restore and migrate while it runs. It counts in RAM
 * and, when asked, keeps writing a buffer of pages, each with the count at which
 * it was written last, so that a page a migration failed to copy again shows;
 * commands arrive on COM1, one a line:
 *   count         print the counter
 *   blk           read sector 0 of disk 0 (opened before the snapshot) and print its CRC
 *   dirty N       write N pages (from DIRTY_BASE) round-robin from now on; 0 stops
 *   verify        check every page holds what the last round wrote into it
 *   vmgenid       print the VM generation ID's 16 bytes (x86: at VMGENID_ADDR, as the DSDT says;
 *                 arm64: where the device tree's "microsoft,vmgenid" node says, if it has one)
 *   quit          end the test
 */
#include "lib.h"
#include "probe.h"
#include "vdrivers.h"

#define DIRTY_BASE	(RAM_BASE + (96UL << 20))	/* above the DMA area */
#define POLL_EVERY	(1UL << 14)	/* counter steps between looks at the serial port */
#ifdef __aarch64__
#define VMGENID_ADDR	dt.vmgenid
#else
#define VMGENID_ADDR	0xEF000UL	/* arch/x86_64/layout.py */
#endif

static volatile u64 snap_counter;
static volatile u64 dirty_pages, dirty_written;

static void dirty_step(void)
{
	u64 n = dirty_pages;

	if (!n)
		return;
	*(volatile u64 *)(DIRTY_BASE + (dirty_written % n) * 4096) = dirty_written + 1;
	dirty_written++;
}

static int dirty_verify(void)
{
	u64 n = dirty_pages, done = dirty_written;

	for (u64 p = 0; p < n && p < done; p++) {
		/* the last write to page p was step s = the largest s < done with s % n == p */
		u64 last = done - 1 - ((done - 1 - p) % n);
		u64 got = *(volatile u64 *)(DIRTY_BASE + p * 4096);
		if (got != last + 1) {
			printf("probe: snap verify=bad page=%lu got=%lu want=%lu\n", p, got, last + 1);
			return 0;
		}
	}
	printf("probe: snap verify=ok pages=%lu writes=%lu\n", n, done);
	return 1;
}

static u64 parse_u64(const char *s)
{
	u64 v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

int test_snapshot(void)
{
	struct blk b;
	int have_blk = blk_open(&b, 0) != -1 && b.dev.features;
	u8 *buf = dma_alloc(4096, 4096);
	char line[64];
	size_t n = 0;
	int ok = 1;

	printf("probe: snap ready blk=%d\n", have_blk);
	for (;;) {
		for (u64 i = 0; i < POLL_EVERY; i++) {
			snap_counter++;
			dirty_step();
		}
		int c = serial_getc();
		if (c < 0)
			continue;
		if (c != '\r' && c != '\n') {
			if (n < sizeof(line) - 1)
				line[n++] = (char)c;
			continue;
		}
		if (!n)
			continue;
		line[n] = 0;
		n = 0;
		if (!strncmp(line, "count", 6)) {
			printf("probe: snap count=%lu\n", snap_counter);
		} else if (!strncmp(line, "blk", 4) && have_blk) {
			u8 s = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf, 4096, 1, 0);
			printf("probe: snap blk read=%s crc32=0x%x\n", blk_status_name(s), crc32(buf, 4096));
			ok &= s == BLK_OK;
		} else if (!strncmp(line, "dirty ", 6)) {
			u64 pages = parse_u64(line + 6);
			if (DIRTY_BASE + pages * 4096 > RAM_BASE + boot.ram) {
				printf("probe: snap dirty too-big\n");
				continue;
			}
			dirty_written = 0;
			dirty_pages = pages;
			printf("probe: snap dirty pages=%lu\n", pages);
		} else if (!strncmp(line, "vmgenid", 8) && !VMGENID_ADDR) {
			printf("probe: snap vmgenid=none\n");
		} else if (!strncmp(line, "vmgenid", 8)) {
			const volatile u8 *id = (const volatile u8 *)VMGENID_ADDR;
			static const char digits[] = "0123456789abcdef";
			char hex[33];
			for (int i = 0; i < 16; i++) {
				hex[2 * i] = digits[id[i] >> 4];
				hex[2 * i + 1] = digits[id[i] & 15];
			}
			hex[32] = 0;
			printf("probe: snap vmgenid=%s\n", hex);
		} else if (!strncmp(line, "verify", 7)) {
			ok &= dirty_verify();
		} else if (!strncmp(line, "quit", 5)) {
			return ok;
		} else {
			printf("probe: snap unknown %s\n", line);
		}
	}
}
