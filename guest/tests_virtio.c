/* Tests of the virtio devices, driven through the polling driver. */
#include "probe.h"
#include "virtio.h"

#define TIMEOUT	(20UL * 1000 * 1000 * 1000)	/* TSC cycles: seconds on any host */
#define VRING_INT	1

/* rng: the device fills writable buffers with random bytes and raises its interrupt. */
int test_rng(void)
{
	struct vdev dev;
	struct vq q;
	u32 head, len, isr;
	u8 *buf;
	int nonzero = 0;

	if (virtio_find(VIRTIO_ID_RNG, 0, &dev)) {
		printf("probe: rng no device\n");
		return 0;
	}
	if (virtio_init(&dev, 0) || vq_setup(&dev, 0, &q, 64)) {
		printf("probe: rng setup failed\n");
		return 0;
	}
	virtio_driver_ok(&dev);
	buf = dma_alloc(4096, 64);
	memset(buf, 0, 4096);
	struct vbuf b = { buf, 4096, 1 };
	vq_submit(&q, &b, 1);
	if (vq_wait(&q, &head, &len, TIMEOUT)) {
		printf("probe: rng timeout\n");
		return 0;
	}
	for (u32 i = 0; i < len; i++)
		nonzero += buf[i] != 0;
	isr = virtio_isr(&dev);
	virtio_ack(&dev, isr);
	printf("probe: rng irq=%u bytes=%u nonzero=%u isr=0x%x after-ack=0x%x\n", dev.irq, len, nonzero,
	       isr, virtio_isr(&dev));
	virtio_reset(&dev);
	/* random bytes: a 4 KiB buffer with more than 90% non-zero bytes */
	return len == 4096 && nonzero > 3686 && (isr & VRING_INT);
}

/* rng-rate: fetch 8 KiB in 1 KiB requests; the host times it against max-bytes/period. */
int test_rng_rate(void)
{
	struct vdev dev;
	struct vq q;
	u32 head, len, total = 0;
	u8 *buf;

	if (virtio_find(VIRTIO_ID_RNG, 0, &dev) || virtio_init(&dev, 0) || vq_setup(&dev, 0, &q, 64)) {
		printf("probe: rng-rate no device\n");
		return 0;
	}
	virtio_driver_ok(&dev);
	buf = dma_alloc(1024, 64);
	printf("probe: rng-rate start\n");
	while (total < 8192) {
		struct vbuf b = { buf, 1024, 1 };
		vq_submit(&q, &b, 1);
		if (vq_wait(&q, &head, &len, TIMEOUT)) {
			printf("probe: rng-rate timeout after %u bytes\n", total);
			return 0;
		}
		total += len;
	}
	printf("probe: rng-rate done bytes=%u\n", total);
	virtio_reset(&dev);
	return total == 8192;
}
