/* Polling drivers for virtio-blk, virtio-net and virtio-vsock, shared by the probe's tests. */
#include "vdrivers.h"

u8 blk_rw(struct blk *b, u32 type, u64 sector, u8 *data, u32 len, int n_parts, int indirect)
{
	struct vbuf bufs[6];
	int n = 0, writable = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
	u32 head, used;

	b->hdr->type = type;
	b->hdr->reserved = 0;
	b->hdr->sector = sector;
	*b->status = 0xee;
	bufs[n++] = (struct vbuf){ b->hdr, sizeof(*b->hdr), 0 };
	for (int i = 0; len && i < n_parts; i++)
		bufs[n++] = (struct vbuf){ data + i * (len / n_parts), len / n_parts, writable };
	bufs[n++] = (struct vbuf){ b->status, 1, 1 };
	if (!indirect) {
		vq_submit(&b->q, bufs, n);
	} else {
		for (int i = 0; i < n; i++) {
			b->indirect[i].addr = (u64)bufs[i].addr;
			b->indirect[i].len = bufs[i].len;
			b->indirect[i].flags = (u16)((bufs[i].writable ? VRING_DESC_F_WRITE : 0) |
						     (i + 1 < n ? VRING_DESC_F_NEXT : 0));
			b->indirect[i].next = (u16)(i + 1);
		}
		struct vring_desc *d = &b->q.desc[b->q.next_desc];
		u16 h = b->q.next_desc;
		d->addr = (u64)b->indirect;
		d->len = (u32)(n * sizeof(struct vring_desc));
		d->flags = VRING_DESC_F_INDIRECT;
		b->q.next_desc = (u16)((h + 1) % b->q.size);
		vq_publish(&b->q, h);
	}
	if (vq_wait(&b->q, &head, &used, TIMEOUT))
		return BLK_TIMEOUT;
	return *b->status;
}

const char *blk_status_name(u8 s)
{
	return s == BLK_OK ? "ok" : s == BLK_IOERR ? "ioerr" : s == BLK_UNSUPP ? "unsupp" : "timeout";
}

int blk_open(struct blk *b, int nth)
{
	u64 want = 1UL << VIRTIO_BLK_F_SEG_MAX | 1UL << VIRTIO_BLK_F_RO | 1UL << VIRTIO_BLK_F_BLK_SIZE |
		   1UL << VIRTIO_BLK_F_FLUSH | 1UL << VIRTIO_BLK_F_DISCARD | 1UL << VIRTIO_BLK_F_WRITE_ZEROES |
		   1UL << VIRTIO_F_INDIRECT_DESC;

	if (virtio_find(VIRTIO_ID_BLOCK, nth, &b->dev))
		return -1;
	if (virtio_init(&b->dev, want) || vq_setup(&b->dev, 0, &b->q, 128))
		return -2;
	virtio_driver_ok(&b->dev);
	b->hdr = dma_alloc(sizeof(struct blk_hdr), 16);
	b->status = dma_alloc(1, 1);
	b->indirect = dma_alloc(8 * sizeof(struct vring_desc), 16);
	return 0;
}

int net_open(struct netdev *n, int nth)
{
	if (virtio_find(VIRTIO_ID_NET, nth, &n->dev) ||
	    virtio_init(&n->dev, 1UL << VIRTIO_NET_F_MAC | 1UL << VIRTIO_NET_F_STATUS | 1UL << VIRTIO_NET_F_MRG_RXBUF) ||
	    vq_setup(&n->dev, 0, &n->rx, 128) || vq_setup(&n->dev, 1, &n->tx, 128))
		return -1;
	virtio_driver_ok(&n->dev);
	u32 lo = virtio_config32(&n->dev, 0), hi = virtio_config32(&n->dev, 4);
	for (int i = 0; i < 4; i++)
		n->mac[i] = (u8)(lo >> (8 * i));
	n->mac[4] = (u8)hi;
	n->mac[5] = (u8)(hi >> 8);
	for (int i = 0; i < 64; i++) {
		struct vbuf b = { dma_alloc(NET_RXBUF, 64), NET_RXBUF, 1 };
		vq_submit(&n->rx, &b, 1);
	}
	n->txbuf = dma_alloc(NET_HDR + 1514, 64);
	return 0;
}

int net_send(struct netdev *n, u32 i)
{
	u8 *f = n->txbuf + NET_HDR;
	u32 head, len;

	memset(n->txbuf, 0, NET_HDR + 60);
	memset(f, 0xff, 6);
	memcpy(f + 6, n->mac, 6);
	f[12] = ETH_P_PROBE >> 8;
	f[13] = ETH_P_PROBE & 0xff;
	memcpy(f + 14, "altovirt-probe ", 15);
	for (int k = 0; k < 8; k++)
		f[29 + k] = "0123456789abcdef"[(i >> (28 - 4 * k)) & 0xf];
	struct vbuf b = { n->txbuf, NET_HDR + 60, 0 };
	vq_submit(&n->tx, &b, 1);
	return vq_wait(&n->tx, &head, &len, TIMEOUT);
}

long net_recv(struct netdev *n, u64 timeout)
{
	u32 head, len;

	for (;;) {
		if (vq_wait(&n->rx, &head, &len, timeout))
			return -1;
		u8 *buf = (u8 *)n->rx.desc[head].addr, *f = buf + NET_HDR;
		long num = -1;
		u16 nbuf = (u16)(buf[10] | buf[11] << 8);
		if (len >= NET_HDR + 45 && nbuf == 1 && f[12] == ETH_P_PROBE >> 8 && f[13] == (ETH_P_PROBE & 0xff) &&
		    !strncmp((char *)f + 14, "echo altovirt-probe ", 20) && !memcmp(f, n->mac, 6)) {
			num = 0;
			for (int k = 0; k < 8; k++) {
				char c = (char)f[34 + k];
				num = num * 16 + (c <= '9' ? c - '0' : c - 'a' + 10);
			}
		}
		struct vbuf again = { buf, NET_RXBUF, 1 };
		vq_submit(&n->rx, &again, 1);
		if (num >= 0)
			return num;
	}
}

void mac_string(const u8 *mac, char *out)
{
	for (int i = 0; i < 6; i++) {
		out[3 * i] = "0123456789abcdef"[mac[i] >> 4];
		out[3 * i + 1] = "0123456789abcdef"[mac[i] & 0xf];
		out[3 * i + 2] = i < 5 ? ':' : 0;
	}
}

int vsock_open(struct vsk *v)
{
	if (virtio_find(VIRTIO_ID_VSOCK, 0, &v->dev) || virtio_init(&v->dev, 0) || vq_setup(&v->dev, 0, &v->rx, 64) ||
	    vq_setup(&v->dev, 1, &v->tx, 64) || vq_setup(&v->dev, 2, &v->ev, 8))
		return -1;
	virtio_driver_ok(&v->dev);
	v->cid = virtio_config64(&v->dev, 0);
	v->txbuf = dma_alloc(VSOCK_TXBUF, 64);
	v->fwd_cnt = v->fwd_sent = 0;
	for (int i = 0; i < 48; i++) {
		struct vbuf b = { dma_alloc(VSOCK_RXBUF, 64), VSOCK_RXBUF, 1 };
		vq_submit(&v->rx, &b, 1);
	}
	return 0;
}

int vsock_send(struct vsk *v, u32 src_port, u32 dst_port, u16 op, u32 flags, const void *data, u32 len)
{
	struct vsock_hdr *h = (struct vsock_hdr *)v->txbuf;
	u32 head, used;

	if (len > VSOCK_TXBUF - sizeof(*h))
		return -1;
	*h = (struct vsock_hdr){ v->cid, VSOCK_HOST_CID, src_port, dst_port, len, 1, op, flags,
				 VSOCK_BUF_ALLOC, v->fwd_cnt };
	v->fwd_sent = v->fwd_cnt;
	if (len)
		memcpy(v->txbuf + sizeof(*h), data, len);
	struct vbuf b = { v->txbuf, (u32)sizeof(*h) + len, 0 };
	vq_submit(&v->tx, &b, 1);
	return vq_wait(&v->tx, &head, &used, TIMEOUT);
}

int vsock_recv(struct vsk *v, struct vsock_hdr *h, u8 *data, u64 timeout)
{
	u32 head, len;

	if (vq_wait(&v->rx, &head, &len, timeout))
		return -1;
	u8 *buf = (u8 *)v->rx.desc[head].addr;
	memcpy(h, buf, sizeof(*h));
	if (h->len > VSOCK_RXBUF - sizeof(*h))
		h->len = 0;
	memcpy(data, buf + sizeof(*h), h->len);
	struct vbuf again = { buf, VSOCK_RXBUF, 1 };
	vq_submit(&v->rx, &again, 1);
	return 0;
}
