/*
 * blkbench: sequential 1 MiB reads and writes (MB/s) and 4 KiB random reads
 * at queue depth 1 and 32 (IOPS) on the first disk. Time is the TSC, its rate
 * taken from tsc_hz() (on x86 kvmclock's scale, on arm64 CNTFRQ_EL0).
 */
#include "probe.h"
#include "virtio.h"

#define T_IN	0
#define T_OUT	1
#define DEPTH	32
#define SEQ_BYTES	(256UL << 20)
#define MiB	(1UL << 20)

struct req {
	struct { u32 type, reserved; u64 sector; } hdr;
	u8 status;
	u8 *data;
};

static struct vdev dev;
static struct vq q;
static struct req *reqs;

/* Request i always uses descriptors 3i..3i+2, so completions may come in any order. */
static void submit(int i, u32 type, u64 sector, u32 len)
{
	struct req *r = &reqs[i];
	struct vring_desc *d = &q.desc[3 * i];

	r->hdr.type = type;
	r->hdr.sector = sector;
	r->status = 0xee;
	d[0] = (struct vring_desc){ (u64)&r->hdr, 16, VRING_DESC_F_NEXT, (u16)(3 * i + 1) };
	d[1] = (struct vring_desc){ (u64)r->data, len,
				    (u16)(VRING_DESC_F_NEXT | (type == T_IN ? VRING_DESC_F_WRITE : 0)),
				    (u16)(3 * i + 2) };
	d[2] = (struct vring_desc){ (u64)&r->status, 1, VRING_DESC_F_WRITE, 0 };
	vq_publish(&q, (u16)(3 * i));
}

static int complete(void)
{
	u32 head, len;
	if (vq_wait(&q, &head, &len, 3 * TIMEOUT))
		return -1;
	return reqs[head / 3].status == 0 ? (int)(head / 3) : -1;
}

static u64 rnd_state = 0x2545f4914f6cdd1dUL;
static u64 rnd(void)
{
	rnd_state ^= rnd_state << 13;
	rnd_state ^= rnd_state >> 7;
	rnd_state ^= rnd_state << 17;
	return rnd_state;
}

/* Sequential: DEPTH-deep pipeline of 1 MiB requests over SEQ_BYTES. */
static u64 seq(u32 type, u64 capacity_bytes)
{
	u64 total = SEQ_BYTES < capacity_bytes ? SEQ_BYTES : capacity_bytes, next = 0, done = 0;
	int depth = 4;

	for (int i = 0; i < depth && next < total; i++, next += MiB)
		submit(i, type, next / 512, MiB);
	while (done < total) {
		int i = complete();
		if (i < 0)
			return 0;
		done += MiB;
		if (next < total) {
			submit(i, type, next / 512, MiB);
			next += MiB;
		}
	}
	return total;
}

static u64 random_reads(int depth, u64 count, u64 sectors4k)
{
	u64 sent = 0, done = 0;

	for (int i = 0; i < depth && sent < count; i++, sent++)
		submit(i, T_IN, (rnd() % sectors4k) * 8, 4096);
	while (done < count) {
		int i = complete();
		if (i < 0)
			return 0;
		done++;
		if (sent < count) {
			submit(i, T_IN, (rnd() % sectors4k) * 8, 4096);
			sent++;
		}
	}
	return done;
}

int test_blkbench(void)
{
	u64 hz = tsc_hz(), t0, cap;
	u64 mbps_w, mbps_r, iops1, iops32;

	if (!hz || virtio_find(VIRTIO_ID_BLOCK, 0, &dev) || virtio_init(&dev, 0) || vq_setup(&dev, 0, &q, 128)) {
		printf("probe: blkbench setup failed (tsc_hz=%lu)\n", hz);
		return 0;
	}
	virtio_driver_ok(&dev);
	cap = virtio_config64(&dev, 0) * 512;
	reqs = dma_alloc(sizeof(struct req) * DEPTH, 64);
	for (int i = 0; i < DEPTH; i++)
		reqs[i].data = dma_alloc(i < 4 ? MiB : 4096, 4096);

	t0 = rdtsc();
	u64 bytes = seq(T_OUT, cap);
	mbps_w = bytes * hz / (rdtsc() - t0) / 1000000;
	t0 = rdtsc();
	bytes = seq(T_IN, cap);
	mbps_r = bytes * hz / (rdtsc() - t0) / 1000000;
	t0 = rdtsc();
	u64 n = random_reads(1, 3000, cap / 4096);
	iops1 = n * hz / (rdtsc() - t0);
	t0 = rdtsc();
	n = random_reads(DEPTH, 20000, cap / 4096);
	iops32 = n * hz / (rdtsc() - t0);
	printf("probe: blkbench tsc_khz=%lu seq-write-MBps=%lu seq-read-MBps=%lu rand4k-qd1-iops=%lu "
	       "rand4k-qd32-iops=%lu\n", hz / 1000, mbps_w, mbps_r, iops1, iops32);
	virtio_reset(&dev);
	return mbps_w && mbps_r && iops1 && iops32;
}
