/* A polling virtio-mmio (version 2) driver for the probe. */
#ifndef PROBE_VIRTIO_H
#define PROBE_VIRTIO_H
#include "lib.h"

#define VIRTIO_ID_NET		1
#define VIRTIO_ID_BLOCK		2
#define VIRTIO_ID_CONSOLE	3
#define VIRTIO_ID_RNG		4
#define VIRTIO_ID_VSOCK		19

#define VIRTIO_F_INDIRECT_DESC	28
#define VIRTIO_F_EVENT_IDX	29
#define VIRTIO_F_VERSION_1	32

#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2
#define VRING_DESC_F_INDIRECT	4

#define VIRTIO_STATUS_NEEDS_RESET	64

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct vdev {
	u64 base;
	u32 irq;
	u32 id;
	u64 features;		/* negotiated */
};

struct vq {
	struct vdev *dev;
	u32 index;
	u16 size;
	u16 last_used;
	u16 next_desc;
	u16 avail_idx;
	struct vring_desc *desc;
	volatile u16 *avail;	/* flags, idx, ring[size], used_event */
	volatile u8 *used;	/* flags, idx, {id, len}[size], avail_event */
};

struct vbuf {
	void *addr;
	u32 len;
	int writable;
};

int virtio_find(u32 device_id, int nth, struct vdev *dev);
int virtio_init(struct vdev *dev, u64 wanted);
int vq_setup(struct vdev *dev, u32 index, struct vq *q, u16 size);
void virtio_driver_ok(struct vdev *dev);
u32 virtio_status(struct vdev *dev);
u32 virtio_isr(struct vdev *dev);
u32 virtio_generation(struct vdev *dev);
void virtio_ack(struct vdev *dev, u32 bits);
u32 virtio_config32(struct vdev *dev, u32 offset);
u64 virtio_config64(struct vdev *dev, u32 offset);
void virtio_reset(struct vdev *dev);

/* Put a chain of buffers on the ring, publish it and notify; returns the head. */
int vq_submit(struct vq *q, const struct vbuf *bufs, int n);
/* Publish a raw, already-written chain head (for abuse tests). */
void vq_publish(struct vq *q, u16 head);
/* Wait for the next used element; returns 0 and fills head/len, -1 on timeout. */
int vq_wait(struct vq *q, u32 *head, u32 *len, u64 timeout_cycles);
void *dma_alloc(u64 size, u64 align);

#endif
