/*
 * The probe's virtio-mmio driver (VIRTIO 1.2, 4.2 and 2.7): devices are
 * found as Linux finds them, on x86 through "virtio_mmio.device=<size>@<base>:<irq>"
 * on the command line, on arm64 through the device tree's "virtio,mmio" nodes;
 * everything is polled.
 */
#include "virtio.h"
#include "probe.h"

#define REG_MAGIC		0x000
#define REG_VERSION		0x004
#define REG_DEVICE_ID		0x008
#define REG_DEVICE_FEATURES	0x010
#define REG_DEVICE_FEATURES_SEL	0x014
#define REG_DRIVER_FEATURES	0x020
#define REG_DRIVER_FEATURES_SEL	0x024
#define REG_QUEUE_SEL		0x030
#define REG_QUEUE_NUM_MAX	0x034
#define REG_QUEUE_NUM		0x038
#define REG_QUEUE_READY		0x044
#define REG_QUEUE_NOTIFY	0x050
#define REG_INTERRUPT_STATUS	0x060
#define REG_INTERRUPT_ACK	0x064
#define REG_STATUS		0x070
#define REG_QUEUE_DESC		0x080
#define REG_QUEUE_DRIVER	0x090
#define REG_QUEUE_DEVICE	0x0a0
#define REG_CONFIG_GENERATION	0x0fc
#define REG_CONFIG		0x100

#define STATUS_ACKNOWLEDGE	1
#define STATUS_DRIVER		2
#define STATUS_DRIVER_OK	4
#define STATUS_FEATURES_OK	8

static u32 rd(struct vdev *d, u32 reg) { return rd32(d->base + reg); }
static void wr(struct vdev *d, u32 reg, u32 v) { wr32(d->base + reg, v); }

/* Is the transport at base a version-2 device with this ID, and the nth such? */
static int take(u64 base, u32 irq, u32 device_id, int *nth, struct vdev *dev)
{
	if (rd32(base + REG_MAGIC) == 0x74726976 && rd32(base + REG_VERSION) == 2 &&
	    rd32(base + REG_DEVICE_ID) == device_id && (*nth)-- == 0) {
		dev->base = base;
		dev->irq = irq;
		dev->id = device_id;
		return 1;
	}
	return 0;
}

#ifdef __aarch64__
/* The nth device with this ID among the device tree's transports (empty ones have ID 0). */
int virtio_find(u32 device_id, int nth, struct vdev *dev)
{
	for (u32 i = 0; i < dt.n_virtio; i++)
		if (take(dt.virtio[i].base, dt.virtio[i].irq, device_id, &nth, dev))
			return 0;
	return -1;
}
#else
static u64 parse_num(const char **p)
{
	u64 v = 0;
	const char *s = *p;
	if (s[0] == '0' && s[1] == 'x') {
		for (s += 2;; s++) {
			int c = *s;
			if (c >= '0' && c <= '9') v = v * 16 + (c - '0');
			else if (c >= 'a' && c <= 'f') v = v * 16 + (c - 'a' + 10);
			else if (c >= 'A' && c <= 'F') v = v * 16 + (c - 'A' + 10);
			else break;
		}
	} else {
		while (*s >= '0' && *s <= '9')
			v = v * 10 + (u64)(*s++ - '0');
		if (*s == 'K' || *s == 'k') { v <<= 10; s++; }
	}
	*p = s;
	return v;
}

/* The nth device with this ID among the command line's virtio_mmio.device= entries. */
int virtio_find(u32 device_id, int nth, struct vdev *dev)
{
	static const char key[] = "virtio_mmio.device=";
	const char *p = boot.cmdline;

	while (p && *p) {
		if (!strncmp(p, key, sizeof(key) - 1)) {
			const char *s = p + sizeof(key) - 1;
			parse_num(&s);			/* size */
			if (*s == '@') {
				s++;
				u64 base = parse_num(&s);
				u32 irq = 0;
				if (*s == ':') {
					s++;
					irq = (u32)parse_num(&s);
				}
				if (take(base, irq, device_id, &nth, dev))
					return 0;
			}
		}
		while (*p && *p != ' ')
			p++;
		while (*p == ' ')
			p++;
	}
	return -1;
}
#endif

void virtio_reset(struct vdev *d)
{
	wr(d, REG_STATUS, 0);
}

/* Reset, acknowledge and negotiate: 0 when FEATURES_OK stuck. */
int virtio_init(struct vdev *d, u64 wanted)
{
	u64 offered;

	virtio_reset(d);
	wr(d, REG_STATUS, STATUS_ACKNOWLEDGE);
	wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	wr(d, REG_DEVICE_FEATURES_SEL, 0);
	offered = rd(d, REG_DEVICE_FEATURES);
	wr(d, REG_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(d, REG_DEVICE_FEATURES) << 32;
	d->features = offered & (wanted | (1UL << VIRTIO_F_VERSION_1));
	wr(d, REG_DRIVER_FEATURES_SEL, 0);
	wr(d, REG_DRIVER_FEATURES, (u32)d->features);
	wr(d, REG_DRIVER_FEATURES_SEL, 1);
	wr(d, REG_DRIVER_FEATURES, (u32)(d->features >> 32));
	wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	return (rd(d, REG_STATUS) & STATUS_FEATURES_OK) ? 0 : -1;
}

/*
 * Buffers shared with devices come from RAM above the image rather than from
 * .bss: on PVM every page the probe clears costs a shadow-MMU fault, so only
 * what is allocated gets touched. Below any initrd, which sits at the top.
 */
#define DMA_START	(RAM_BASE + (32UL << 20))
#define DMA_END		(RAM_BASE + (96UL << 20))
static u64 dma_next = DMA_START;

void *dma_alloc(u64 size, u64 align)
{
	u64 addr = (dma_next + align - 1) & ~(align - 1);
	u64 end = DMA_END;

	if (boot.initrd_size && boot.initrd < end)
		end = boot.initrd;
	if (addr + size > end)
		return NULL;
	dma_next = addr + size;
	return (void *)addr;
}

int vq_setup(struct vdev *d, u32 index, struct vq *q, u16 size)
{
	u32 max;

	wr(d, REG_QUEUE_SEL, index);
	max = rd(d, REG_QUEUE_NUM_MAX);
	if (!max || rd(d, REG_QUEUE_READY))
		return -1;
	if (size > max)
		size = (u16)max;
	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	q->size = size;
	q->desc = dma_alloc(16UL * size, 4096);
	q->avail = dma_alloc(6 + 2UL * size, 2);
	q->used = dma_alloc(6 + 8UL * size, 4096);
	if (!q->desc || !q->avail || !q->used)
		return -1;
	memset(q->desc, 0, 16UL * size);
	memset((void *)q->avail, 0, 6 + 2UL * size);
	memset((void *)q->used, 0, 6 + 8UL * size);
	wr(d, REG_QUEUE_NUM, size);
	wr(d, REG_QUEUE_DESC, (u32)(u64)q->desc);
	wr(d, REG_QUEUE_DESC + 4, (u32)((u64)q->desc >> 32));
	wr(d, REG_QUEUE_DRIVER, (u32)(u64)q->avail);
	wr(d, REG_QUEUE_DRIVER + 4, (u32)((u64)q->avail >> 32));
	wr(d, REG_QUEUE_DEVICE, (u32)(u64)q->used);
	wr(d, REG_QUEUE_DEVICE + 4, (u32)((u64)q->used >> 32));
	wr(d, REG_QUEUE_READY, 1);
	return 0;
}

void virtio_driver_ok(struct vdev *d)
{
	wr(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

u32 virtio_status(struct vdev *d) { return rd(d, REG_STATUS); }
u32 virtio_isr(struct vdev *d) { return rd(d, REG_INTERRUPT_STATUS); }
u32 virtio_generation(struct vdev *d) { return rd(d, REG_CONFIG_GENERATION); }
void virtio_ack(struct vdev *d, u32 bits) { wr(d, REG_INTERRUPT_ACK, bits); }
u32 virtio_config32(struct vdev *d, u32 off) { return rd(d, REG_CONFIG + off); }
u64 virtio_config64(struct vdev *d, u32 off)
{
	return rd(d, REG_CONFIG + off) | ((u64)rd(d, REG_CONFIG + off + 4) << 32);
}

void vq_publish(struct vq *q, u16 head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	__atomic_thread_fence(__ATOMIC_RELEASE);
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	wr(q->dev, REG_QUEUE_NOTIFY, q->index);
}

int vq_submit(struct vq *q, const struct vbuf *bufs, int n)
{
	u16 head = q->next_desc;

	for (int i = 0; i < n; i++) {
		u16 d = (u16)((head + i) % q->size);
		q->desc[d].addr = (u64)bufs[i].addr;
		q->desc[d].len = bufs[i].len;
		q->desc[d].flags = (u16)((bufs[i].writable ? VRING_DESC_F_WRITE : 0) |
					 (i + 1 < n ? VRING_DESC_F_NEXT : 0));
		q->desc[d].next = (u16)((d + 1) % q->size);
	}
	q->next_desc = (u16)((head + n) % q->size);
	vq_publish(q, head);
	return head;
}

int vq_wait(struct vq *q, u32 *head, u32 *len, u64 timeout)
{
	volatile u16 *used_idx = (volatile u16 *)(q->used + 2);
	u64 t0 = rdtsc();

	while (*used_idx == q->last_used) {
		if (rdtsc() - t0 > timeout)
			return -1;
		cpu_relax();
	}
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	volatile u32 *elem = (volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->size));
	*head = elem[0];
	*len = elem[1];
	q->last_used++;
	return 0;
}
