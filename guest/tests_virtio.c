/* Tests of the virtio devices, driven through the polling driver. */
#include "probe.h"
#include "vdrivers.h"

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


static u8 pattern(u32 disk, u32 j) { return (u8)(j * 7 + 3 + disk); }

/* blk: every disk, every request type, checked by the host on the image files. */
int test_blk(void)
{
	int ok = 1, disks = 0;

	for (int n = 0; n < 8; n++) {
		struct blk b;
		char serial[21];
		u8 *buf, s_write, s_flush, s_zero = BLK_UNSUPP, s_discard = BLK_UNSUPP, s_oob, s_unknown, s_id;
		int back = 1;

		if (blk_open(&b, n) == -1)
			break;
		disks++;
		if (!b.dev.features) {
			printf("probe: blk%d setup failed\n", n);
			ok = 0;
			continue;
		}
		u64 capacity = virtio_config64(&b.dev, 0);
		u32 blk_size = virtio_config32(&b.dev, 20), seg_max = virtio_config32(&b.dev, 12);
		int ro = (b.dev.features >> VIRTIO_BLK_F_RO) & 1;
		buf = dma_alloc(4096, 4096);

		memset(serial, 0, sizeof(serial));
		s_id = blk_rw(&b, VIRTIO_BLK_T_GET_ID, 0, (u8 *)serial, 20, 1, 0);
		u8 s_read = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf, 4096, 2, 0);
		u32 crc = crc32(buf, 4096);
		for (u32 j = 0; j < 4096; j++)
			buf[j] = pattern((u32)n, j);
		s_write = blk_rw(&b, VIRTIO_BLK_T_OUT, 8, buf, 4096, 4, 0);
		s_flush = blk_rw(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, 0);
		memset(buf, 0, 4096);
		u8 s_back = blk_rw(&b, VIRTIO_BLK_T_IN, 8, buf, 4096, 1, 1);	/* through an indirect table */
		for (u32 j = 0; j < 4096 && !ro; j++)
			back &= buf[j] == pattern((u32)n, j);
		if (b.dev.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1) {
			struct { u64 sector; u32 num; u32 flags; } *seg = (void *)buf;
			seg->sector = 16; seg->num = 8; seg->flags = 0;
			s_zero = blk_rw(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, buf, 16, 1, 0);
			seg->sector = 24; seg->num = 8; seg->flags = 0;
			s_discard = blk_rw(&b, VIRTIO_BLK_T_DISCARD, 0, buf, 16, 1, 0);
		}
		s_oob = blk_rw(&b, VIRTIO_BLK_T_IN, capacity, buf, 512, 1, 0);
		s_unknown = blk_rw(&b, 0x55, 0, NULL, 0, 0, 0);
		u32 isr = virtio_isr(&b.dev);
		printf("probe: blk%d capacity=%lu blk_size=%u seg_max=%u ro=%d serial=%s id=%s read=%s "
		       "read-crc32=0x%x write=%s flush=%s readback=%s zeroes=%s discard=%s oob=%s unknown=%s "
		       "isr=0x%x\n", n, capacity, blk_size, seg_max, ro, serial[0] ? serial : "-",
		       blk_status_name(s_id), blk_status_name(s_read), crc, blk_status_name(s_write), blk_status_name(s_flush),
		       back ? blk_status_name(s_back) : "mismatch", blk_status_name(s_zero), blk_status_name(s_discard),
		       blk_status_name(s_oob), blk_status_name(s_unknown), isr);
		ok &= s_id == BLK_OK && s_read == BLK_OK && s_flush == BLK_OK && s_back == BLK_OK && back &&
		      s_oob == BLK_IOERR && s_unknown == BLK_UNSUPP && (isr & VRING_INT) &&
		      (ro ? s_write == BLK_IOERR : s_write == BLK_OK && s_zero == BLK_OK && s_discard == BLK_OK);
		virtio_reset(&b.dev);
	}
	printf("probe: blk disks=%d\n", disks);
	return ok && disks > 0;
}

/*
 * virtio-abuse: malformed chains a hostile driver could submit. Each must put
 * the block device in DEVICE_NEEDS_RESET (with a config interrupt) without
 * harming the VMM; after a reset the device works again, and so does the rng.
 */
static const char *const abuse_names[] = {
	"index", "loop", "address", "length", "indirect-nested", "indirect-length",
	"indirect-next", "write-to-readonly", "no-status", "avail-idx",
};

static void abuse_submit(struct blk *b, int which)
{
	struct vring_desc *d = b->q.desc, *t = b->indirect;
	u64 ram_end = RAM_BASE + boot.ram + (1UL << 20);	/* past the top of RAM on any map */

	b->hdr->type = VIRTIO_BLK_T_IN;
	b->hdr->sector = 0;
	d[0] = (struct vring_desc){ (u64)b->hdr, 16, VRING_DESC_F_NEXT, 1 };
	d[1] = (struct vring_desc){ (u64)b->status, 1, VRING_DESC_F_WRITE, 0 };
	switch (which) {
	case 0: d[0].next = 200; break;				/* beyond the 128-entry table */
	case 1: d[1].flags = VRING_DESC_F_NEXT; d[1].next = 0; break;	/* 0 -> 1 -> 0 ... */
	case 2: d[0].addr = 0x7fff00000000UL; break;		/* not guest RAM */
	case 3: d[1].addr = ram_end - 4096; d[1].len = 1U << 30; break;
	case 4:
		t[0] = (struct vring_desc){ (u64)t, 16, VRING_DESC_F_INDIRECT, 0 };
		d[0] = (struct vring_desc){ (u64)t, 16, VRING_DESC_F_INDIRECT, 0 };
		break;
	case 5: d[0] = (struct vring_desc){ (u64)t, 24, VRING_DESC_F_INDIRECT, 0 }; break;
	case 6: d[0] = (struct vring_desc){ (u64)t, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1 }; break;
	case 7:	/* a read whose data buffer is device-readable: the device would write into it */
		d[0].next = 2;
		d[2] = (struct vring_desc){ (u64)b->indirect, 512, VRING_DESC_F_NEXT, 1 };
		break;
	case 8: d[1].flags = 0; break;				/* nothing device-writable */
	case 9:
		b->q.avail_idx = (u16)(b->q.avail_idx + b->q.size + 5);
		break;
	}
	vq_publish(&b->q, 0);
}

int test_virtio_abuse(void)
{
	struct blk b;
	int ok = 1, n = (int)(sizeof(abuse_names) / sizeof(abuse_names[0]));
	u32 head, len;

	for (int which = 0; which < n; which++) {
		if (blk_open(&b, 0)) {
			printf("probe: abuse no block device\n");
			return 0;
		}
		abuse_submit(&b, which);
		u64 t0 = rdtsc();
		while (!(virtio_status(&b.dev) & VIRTIO_STATUS_NEEDS_RESET) && rdtsc() - t0 < TIMEOUT)
			cpu_relax();
		u32 status = virtio_status(&b.dev), isr = virtio_isr(&b.dev);
		int hit = (status & VIRTIO_STATUS_NEEDS_RESET) && (isr & 2);
		printf("probe: abuse %s needs-reset=%d isr=0x%x\n", abuse_names[which], hit, isr);
		ok &= hit;
		virtio_reset(&b.dev);
	}
	/* After a reset the same device serves requests again. */
	if (blk_open(&b, 0) == 0) {
		u8 *buf = dma_alloc(512, 512);
		u8 s = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf, 512, 1, 0);
		printf("probe: abuse blk-after-reset=%s\n", blk_status_name(s));
		ok &= s == BLK_OK;
		virtio_reset(&b.dev);
	}
	(void)head;
	(void)len;
	return ok;
}

/*
 * console: hvc0 both ways through the host's unix socket. Output before any
 * client connects must complete (dropped, not blocking); then a line from the
 * host comes in and the probe answers it.
 */
int test_console(void)
{
	struct vdev dev;
	struct vq rx, tx;
	u32 head, len, total = 0;
	char line[128];
	size_t n = 0;
	u8 *out;

	if (virtio_find(VIRTIO_ID_CONSOLE, 0, &dev) || virtio_init(&dev, 0) || vq_setup(&dev, 0, &rx, 64) ||
	    vq_setup(&dev, 1, &tx, 64)) {
		printf("probe: console no device\n");
		return 0;
	}
	virtio_driver_ok(&dev);
	for (int i = 0; i < 8; i++) {
		struct vbuf b = { dma_alloc(128, 64), 128, 1 };
		vq_submit(&rx, &b, 1);
	}
	out = dma_alloc(4096, 64);
	memset(out, 'x', 4096);
	for (int i = 0; i < 16; i++) {
		struct vbuf b = { out, 4096, 0 };
		vq_submit(&tx, &b, 1);
		if (vq_wait(&tx, &head, &len, TIMEOUT))
			break;
		total += 4096;
	}
	printf("probe: console unconnected-tx=%u\n", total);
	printf("probe: console ready\n");
	while (n < sizeof(line) - 1) {
		if (vq_wait(&rx, &head, &len, 60 * TIMEOUT)) {
			printf("probe: console rx timeout\n");
			return 0;
		}
		u8 *buf = (u8 *)rx.desc[head].addr;
		int newline = 0;
		for (u32 i = 0; i < len && n < sizeof(line) - 1; i++) {
			if (buf[i] == '\n') {
				newline = 1;
				break;
			}
			line[n++] = (char)buf[i];
		}
		struct vbuf again = { buf, 128, 1 };
		vq_submit(&rx, &again, 1);
		if (newline)
			break;
	}
	line[n] = 0;
	printf("probe: console rx=%s\n", line);
	memcpy(out, "pong ", 5);
	memcpy(out + 5, line, n);
	out[5 + n] = '\n';
	struct vbuf reply = { out, (u32)(n + 6), 0 };
	vq_submit(&tx, &reply, 1);
	int ok = vq_wait(&tx, &head, &len, TIMEOUT) == 0;
	printf("probe: console tx %s\n", ok ? "done" : "timeout");
	virtio_reset(&dev);
	return ok && total == 65536;
}


/* net: frames to the host's echo responder on the tap and back. */
int test_net(void)
{
	struct netdev n;
	u32 got = 0, seen[NET_FRAMES] = { 0 };

	if (net_open(&n, 0)) {
		printf("probe: net no device\n");
		return 0;
	}
	u32 status = virtio_config32(&n.dev, 4) >> 16;
	for (u32 i = 0; i < NET_FRAMES; i++)
		if (net_send(&n, i))
			break;
	while (got < NET_FRAMES) {
		long num = net_recv(&n, TIMEOUT / 4);
		if (num < 0)
			break;
		if (num < NET_FRAMES && !seen[num]++)
			got++;
	}
	char mac[18];
	mac_string(n.mac, mac);
	printf("probe: net mac=%s link=%u tx=%u rx=%u\n", mac, status & 1, NET_FRAMES, got);
	virtio_reset(&n.dev);
	return got == NET_FRAMES && (status & 1);
}

static void u32_to_hex(u32 v, char *out)
{
	for (int k = 0; k < 8; k++)
		out[k] = "0123456789abcdef"[(v >> (28 - 4 * k)) & 0xf];
	out[8] = 0;
}

/* vsock: a host-initiated stream (100 KiB through a 32 KiB window), a guest-initiated one, a refusal. */
int test_vsock(void)
{
	struct vsk v;
	struct vsock_hdr h;
	static u8 data[VSOCK_RXBUF];
	u32 hp = 0, total = 0, crc = 0xffffffff, since_update = 0;
	int credit_ok = 1, ok = 1;

	if (vsock_open(&v)) {
		printf("probe: vsock no device\n");
		return 0;
	}
	printf("probe: vsock cid=%lu ready\n", v.cid);

	/* 1. The host connects to our port 5000 and streams 5 + 102400 bytes. */
	while (!hp) {
		if (vsock_recv(&v, &h, data, 60 * TIMEOUT))
			return 0;
		if (h.op == VSOCK_OP_REQUEST && h.dst_port == 5000)
			hp = h.src_port;
	}
	vsock_send(&v, 5000, hp, VSOCK_OP_RESPONSE, 0, NULL, 0);
	while (total < 5 + 102400) {
		if (vsock_recv(&v, &h, data, TIMEOUT))
			break;
		if (h.op != VSOCK_OP_RW || h.src_port != hp)
			continue;
		total += h.len;
		/* the host may have at most our buf_alloc in flight beyond what we consumed */
		credit_ok &= total - v.fwd_cnt <= VSOCK_BUF_ALLOC;
		for (u32 i = 0; i < h.len; i++)
			crc = crc32_update(crc, data[i]);
		v.fwd_cnt += h.len;
		since_update += h.len;
		if (since_update >= VSOCK_BUF_ALLOC / 2) {
			vsock_send(&v, 5000, hp, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
			since_update = 0;
		}
	}
	crc ^= 0xffffffff;
	char reply[32] = "pong ";
	u32_to_hex(crc, reply + 5);
	reply[13] = '\n';
	vsock_send(&v, 5000, hp, VSOCK_OP_RW, 0, reply, 14);
	vsock_send(&v, 5000, hp, VSOCK_OP_SHUTDOWN, 3, NULL, 0);
	printf("probe: vsock host-conn port=5000 bytes=%u crc32=0x%x credit-ok=%d\n", total, crc, credit_ok);
	ok &= total == 5 + 102400 && credit_ok;

	/* 2. We connect to the host's port 6000 and exchange a line each way. */
	v.fwd_cnt = 0;
	vsock_send(&v, 1234, 6000, VSOCK_OP_REQUEST, 0, NULL, 0);
	int state = 0;		/* 0 connecting, 1 connected, 2 answered */
	char line[64] = "";
	while (state < 2) {
		if (vsock_recv(&v, &h, data, TIMEOUT))
			break;
		if (h.dst_port != 1234 || h.src_port != 6000)
			continue;
		if (h.op == VSOCK_OP_RESPONSE) {
			state = 1;
			vsock_send(&v, 1234, 6000, VSOCK_OP_RW, 0, "hello from the guest\n", 21);
		} else if (h.op == VSOCK_OP_RW) {
			u32 n = h.len < sizeof(line) - 1 ? h.len : sizeof(line) - 1;
			memcpy(line, data, n);
			line[n && line[n - 1] == '\n' ? n - 1 : n] = 0;
			v.fwd_cnt += h.len;
			state = 2;
		} else if (h.op == VSOCK_OP_RST) {
			break;
		}
	}
	vsock_send(&v, 1234, 6000, VSOCK_OP_SHUTDOWN, 3, NULL, 0);
	printf("probe: vsock guest-conn port=6000 reply=%s\n", line);
	ok &= state == 2;

	/* 3. Nobody listens on the host's port 6001: RST. */
	vsock_send(&v, 1235, 6001, VSOCK_OP_REQUEST, 0, NULL, 0);
	int refused = 0;
	while (!vsock_recv(&v, &h, data, TIMEOUT)) {
		if (h.dst_port == 1235) {
			refused = h.op == VSOCK_OP_RST;
			break;
		}
	}
	printf("probe: vsock refused=%s\n", refused ? "rst" : "no");
	virtio_reset(&v.dev);
	return ok && refused;
}

/* netbench: transmit frames as fast as the device takes them, 64 in flight. */
int test_netbench(void)
{
	struct netdev n;
	const u32 frames = 50000, depth = 64;
	u64 hz = tsc_hz();
	u32 head, len, done = 0, sent = 0;

	if (!hz || net_open(&n, 0)) {
		printf("probe: netbench setup failed\n");
		return 0;
	}
	u8 *bufs = dma_alloc(depth * 128, 64);
	for (u32 i = 0; i < depth; i++) {
		u8 *f = bufs + i * 128 + NET_HDR;
		memset(bufs + i * 128, 0, 128);
		memset(f, 0xff, 6);
		memcpy(f + 6, n.mac, 6);
		f[12] = ETH_P_PROBE >> 8;
		f[13] = ETH_P_PROBE & 0xff;
	}
	u64 t0 = rdtsc();
	for (; sent < depth; sent++) {
		struct vbuf b = { bufs + sent * 128, NET_HDR + 60, 0 };
		vq_submit(&n.tx, &b, 1);
	}
	while (done < frames) {
		if (vq_wait(&n.tx, &head, &len, TIMEOUT))
			break;
		done++;
		if (sent < frames) {
			struct vbuf b = { (void *)n.tx.desc[head].addr, NET_HDR + 60, 0 };
			vq_submit(&n.tx, &b, 1);
			sent++;
		}
	}
	u64 fps = done * hz / (rdtsc() - t0);
	printf("probe: netbench tx-frames=%u fps=%lu\n", done, fps);
	virtio_reset(&n.dev);
	return done == frames;
}

/*
 * net-big: ask the responder for a 4000-byte frame; with 2 KiB receive buffers
 * it arrives in several, merged by num_buffers (VIRTIO_NET_F_MRG_RXBUF).
 */
int test_net_big(void)
{
	struct netdev n;
	u32 head, len, filled = 0, want = 0, bufs = 0;
	static u8 frame[8192];

	if (net_open(&n, 0)) {
		printf("probe: net-big no device\n");
		return 0;
	}
	u8 *f = n.txbuf + NET_HDR;
	memset(n.txbuf, 0, NET_HDR + 60);
	memset(f, 0xff, 6);
	memcpy(f + 6, n.mac, 6);
	f[12] = ETH_P_PROBE >> 8;
	f[13] = ETH_P_PROBE & 0xff;
	memcpy(f + 14, "big", 3);
	struct vbuf b = { n.txbuf, NET_HDR + 60, 0 };
	vq_submit(&n.tx, &b, 1);
	vq_wait(&n.tx, &head, &len, TIMEOUT);
	while (!want || bufs < want) {
		if (vq_wait(&n.rx, &head, &len, TIMEOUT))
			break;
		u8 *buf = (u8 *)n.rx.desc[head].addr, *data = buf;
		u32 n_data = len;
		if (!want) {		/* a frame's first buffer: the header, then the Ethernet frame */
			u8 *e = buf + NET_HDR;
			if (len > NET_HDR + 14 && e[12] == ETH_P_PROBE >> 8 && e[13] == (ETH_P_PROBE & 0xff) &&
			    !memcmp(e, n.mac, 6)) {
				want = (u32)(buf[10] | buf[11] << 8);
				data = e;
				n_data = len - NET_HDR;
			} else {
				n_data = 0;	/* other traffic */
			}
		}
		if (n_data && filled + n_data <= sizeof(frame)) {
			memcpy(frame + filled, data, n_data);
			filled += n_data;
			bufs++;
		}
		struct vbuf again = { buf, NET_RXBUF, 1 };
		vq_submit(&n.rx, &again, 1);
	}
	int match = filled == 4000;
	for (u32 i = 14; match && i < filled; i++)
		match = frame[i] == (u8)(((i - 14) * 13 + 5) & 0xff);
	printf("probe: net-big bytes=%u num_buffers=%u match=%d\n", filled, want, match);
	virtio_reset(&n.dev);
	return match && want > 1;
}

/*
 * fs: one FUSE_INIT on virtio-fs's request queue (virtio 1.2, 5.11; FUSE's <linux/fuse.h>),
 * answered from the host by the vhost-user back end (virtiofsd) through the shared RAM.
 */
#define VIRTIO_ID_FS	26
#define FUSE_INIT	26

struct fuse_in_header {
	u32 len, opcode;
	u64 unique, nodeid;
	u32 uid, gid, pid;
	u16 total_extlen, padding;
};

struct fuse_out_header {
	u32 len;
	int error;
	u64 unique;
};

int test_fs(void)
{
	struct vdev dev;
	struct vq hiprio, request;
	u32 head, len, words[9];
	char tag[37];

	if (virtio_find(VIRTIO_ID_FS, 0, &dev)) {
		printf("probe: fs no device\n");
		return 0;
	}
	for (int i = 0; i < 9; i++)
		words[i] = virtio_config32(&dev, 4 * i);
	memcpy(tag, words, 36);
	tag[36] = 0;
	if (virtio_init(&dev, 0) || vq_setup(&dev, 0, &hiprio, 64) || vq_setup(&dev, 1, &request, 64)) {
		printf("probe: fs setup failed\n");
		return 0;
	}
	virtio_driver_ok(&dev);
	/* fuse_in_header + fuse_init_in (major, minor, max_readahead, flags); room for the reply */
	u8 *in = dma_alloc(64, 64), *out = dma_alloc(128, 64);
	struct fuse_in_header *h = (struct fuse_in_header *)in;
	u32 *init = (u32 *)(in + sizeof(*h));
	memset(in, 0, 64);
	memset(out, 0, 128);
	h->len = sizeof(*h) + 16;
	h->opcode = FUSE_INIT;
	h->unique = 0x1234;
	init[0] = 7;
	init[1] = 31;
	init[2] = 65536;
	struct vbuf b[2] = { { in, h->len, 0 }, { out, 128, 1 } };
	vq_submit(&request, b, 2);
	if (vq_wait(&request, &head, &len, TIMEOUT)) {
		printf("probe: fs timeout\n");
		return 0;
	}
	struct fuse_out_header *o = (struct fuse_out_header *)out;
	u32 *init_out = (u32 *)(out + sizeof(*o));
	printf("probe: fs tag=%s used=%u error=%d unique=0x%lx major=%u minor=%u\n", tag, len, o->error,
	       o->unique, init_out[0], init_out[1]);
	virtio_reset(&dev);
	return o->error == 0 && o->unique == 0x1234 && init_out[0] == 7 && len == o->len;
}
