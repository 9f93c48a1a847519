/*
 * hotplug: a small shell on COM1 through which the host watches the guest's
 * side of hot-plug. Every disk and NIC slot is a device from boot; what is
 * plugged into it changes, and the guest learns of it through a configuration
 * change interrupt and the configuration space, as Linux does.
 *
 *   scan     one line per slot: "slot blkN capacity=... gen=..." or
 *            "slot netN link=up|down mac=..."
 *   wait     wait for configuration change interrupts, acknowledge them and
 *            name the slots ("config-change blk1 net0", or "none")
 *   rw N     on disk slot N (set up once, then kept): read sector 0, write a
 *            pattern at sector 8, flush, read it back
 *   net N    on NIC slot N (set up once, then kept): send a frame, wait for
 *            the host's echo
 *   quit     end the test
 */
#include "probe.h"
#include "vdrivers.h"

#define MAX_BLK	8
#define MAX_NET	2

static struct blk blks[MAX_BLK];
static struct netdev nets[MAX_NET];
static int blk_ready[MAX_BLK], net_ready[MAX_NET];
static struct vdev slots_blk[MAX_BLK], slots_net[MAX_NET];
static int n_blk, n_net;

static u8 pattern(u32 slot, u32 j) { return (u8)(j * 11 + 5 + slot); }


static u32 link_status(struct vdev *d) { return virtio_config32(d, 4) >> 16 & 1; }

static void scan(void)
{
	for (int i = 0; i < n_blk; i++)
		printf("probe: slot blk%d capacity=%lu gen=%u\n", i, virtio_config64(&slots_blk[i], 0),
		       virtio_generation(&slots_blk[i]));
	for (int i = 0; i < n_net; i++) {
		u32 lo = virtio_config32(&slots_net[i], 0), hi = virtio_config32(&slots_net[i], 4);
		u8 mac[6] = { (u8)lo, (u8)(lo >> 8), (u8)(lo >> 16), (u8)(lo >> 24), (u8)hi, (u8)(hi >> 8) };
		char text[18];
		mac_string(mac, text);
		printf("probe: slot net%d link=%s mac=%s\n", i, link_status(&slots_net[i]) ? "up" : "down", text);
	}
}

/* Poll every slot's InterruptStatus for a configuration change (no IRQs here). */
static void wait_config(void)
{
	u64 t0 = rdtsc();
	int seen = 0;

	while (!seen && rdtsc() - t0 < TIMEOUT) {
		for (int i = 0; i < n_blk + n_net; i++) {
			struct vdev *d = i < n_blk ? &slots_blk[i] : &slots_net[i - n_blk];
			if (virtio_isr(d) & CONFIG_INT) {
				virtio_ack(d, CONFIG_INT);
				if (!seen++)
					printf("probe: config-change");
				printf(i < n_blk ? " blk%d" : " net%d", i < n_blk ? i : i - n_blk);
			}
		}
		cpu_relax();
	}
	printf(seen ? "\n" : "probe: config-change none\n");
}

static void rw(int n)
{
	struct blk *b = &blks[n];
	u8 *buf;

	if (n < 0 || n >= n_blk) {
		printf("probe: rw blk%d no such slot\n", n);
		return;
	}
	if (!blk_ready[n]) {
		if (blk_open(b, n)) {
			printf("probe: rw blk%d setup failed\n", n);
			return;
		}
		blk_ready[n] = 1;
	}
	buf = dma_alloc(4096, 4096);
	u64 capacity = virtio_config64(&b->dev, 0);
	u8 s_read = blk_rw(b, VIRTIO_BLK_T_IN, 0, buf, 4096, 1, 0);
	u32 crc = crc32(buf, 4096);
	for (u32 j = 0; j < 4096; j++)
		buf[j] = pattern((u32)n, j);
	u8 s_write = blk_rw(b, VIRTIO_BLK_T_OUT, 8, buf, 4096, 2, 0);
	u8 s_flush = blk_rw(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, 0);
	memset(buf, 0, 4096);
	u8 s_back = blk_rw(b, VIRTIO_BLK_T_IN, 8, buf, 4096, 1, 0);
	int same = 1;
	for (u32 j = 0; j < 4096; j++)
		same &= buf[j] == pattern((u32)n, j);
	printf("probe: rw blk%d capacity=%lu read=%s crc=0x%x write=%s flush=%s readback=%s\n", n, capacity,
	       blk_status_name(s_read), crc, blk_status_name(s_write), blk_status_name(s_flush),
	       s_back == BLK_OK && !same ? "mismatch" : blk_status_name(s_back));
}

static void net(int n)
{
	static u32 frame;

	if (n < 0 || n >= n_net) {
		printf("probe: net%d no such slot\n", n);
		return;
	}
	if (!net_ready[n]) {
		if (net_open(&nets[n], n)) {
			printf("probe: net%d setup failed\n", n);
			return;
		}
		net_ready[n] = 1;
	}
	u32 id = frame++;
	int sent = net_send(&nets[n], id) == 0;
	long echoed = sent ? net_recv(&nets[n], TIMEOUT / 20) : -1;
	printf("probe: net%d link=%s send=%s echo=%s\n", n, link_status(&nets[n].dev) ? "up" : "down",
	       sent ? "ok" : "timeout", echoed == (long)id ? "ok" : "timeout");
}

static int number(const char *s)
{
	int v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0');
	return v;
}

int test_hotplug(void)
{
	char line[64];

	while (n_blk < MAX_BLK && !virtio_find(VIRTIO_ID_BLOCK, n_blk, &slots_blk[n_blk]))
		n_blk++;
	while (n_net < MAX_NET && !virtio_find(VIRTIO_ID_NET, n_net, &slots_net[n_net]))
		n_net++;
	printf("probe: hotplug ready blk=%d net=%d\n", n_blk, n_net);
	for (;;) {
		serial_getline(line, sizeof(line));
		if (!strncmp(line, "scan", 5))
			scan();
		else if (!strncmp(line, "wait", 5))
			wait_config();
		else if (!strncmp(line, "rw ", 3))
			rw(number(line + 3));
		else if (!strncmp(line, "net ", 4))
			net(number(line + 4));
		else if (!strncmp(line, "quit", 5))
			return 1;
		else
			printf("probe: hotplug unknown command %s\n", line);
	}
}
