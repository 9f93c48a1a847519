/* Polling drivers for virtio-blk, virtio-net and virtio-vsock, shared by the probe's tests. */
#ifndef PROBE_VDRIVERS_H
#define PROBE_VDRIVERS_H
#include "virtio.h"

#define VRING_INT	1
#define CONFIG_INT	2

#define VIRTIO_BLK_F_SEG_MAX		2
#define VIRTIO_BLK_F_RO			5
#define VIRTIO_BLK_F_BLK_SIZE		6
#define VIRTIO_BLK_F_FLUSH		9
#define VIRTIO_BLK_F_DISCARD		13
#define VIRTIO_BLK_F_WRITE_ZEROES	14
#define VIRTIO_BLK_T_IN			0
#define VIRTIO_BLK_T_OUT		1
#define VIRTIO_BLK_T_FLUSH		4
#define VIRTIO_BLK_T_GET_ID		8
#define VIRTIO_BLK_T_DISCARD		11
#define VIRTIO_BLK_T_WRITE_ZEROES	13
#define BLK_OK		0
#define BLK_IOERR	1
#define BLK_UNSUPP	2
#define BLK_TIMEOUT	0xff

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct blk {
	struct vdev dev;
	struct vq q;
	struct blk_hdr *hdr;
	u8 *status;
	struct vring_desc *indirect;
};

/* Find the nth disk and set it up: 0, -1 when there is none, -2 when setup fails. */
int blk_open(struct blk *b, int nth);
/* One request: header, data split into n_parts buffers (through an indirect table if asked), status. */
u8 blk_rw(struct blk *b, u32 type, u64 sector, u8 *data, u32 len, int n_parts, int indirect);
const char *blk_status_name(u8 s);

#define VIRTIO_NET_F_MAC	5
#define VIRTIO_NET_F_MRG_RXBUF	15
#define VIRTIO_NET_F_STATUS	16
#define NET_HDR		12		/* struct virtio_net_hdr_v1 */
#define ETH_P_PROBE	0x88b5		/* IEEE 802 local experimental EtherType */
#define NET_FRAMES	32
#define NET_RXBUF	2048

struct netdev {
	struct vdev dev;
	struct vq rx, tx;
	u8 mac[6];
	u8 *txbuf;
};

/* Find the nth NIC, set it up and post receive buffers: 0 or -1. */
int net_open(struct netdev *n, int nth);
/* Send one probe frame numbered i (a broadcast with our EtherType); 0 once it is used. */
int net_send(struct netdev *n, u32 i);
/* Next echoed probe frame: its number, or -1 on timeout. Other traffic is skipped. */
long net_recv(struct netdev *n, u64 timeout);
/* "xx:xx:xx:xx:xx:xx" into out[18]. */
void mac_string(const u8 *mac, char *out);

#define VSOCK_OP_REQUEST	1
#define VSOCK_OP_RESPONSE	2
#define VSOCK_OP_RST		3
#define VSOCK_OP_SHUTDOWN	4
#define VSOCK_OP_RW		5
#define VSOCK_OP_CREDIT_UPDATE	6
#define VSOCK_HOST_CID		2
#define VSOCK_RXBUF		4096
#define VSOCK_TXBUF		8192
#define VSOCK_BUF_ALLOC		(32 * 1024)	/* small on purpose: the host must respect it */

struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vsk {
	struct vdev dev;
	struct vq rx, tx, ev;
	u64 cid;
	u8 *txbuf;
	u32 fwd_cnt;		/* bytes of the current connection we consumed */
	u32 fwd_sent;		/* the fwd_cnt the host last heard of */
};

/* Find the vsock device, set it up and post receive buffers: 0 or -1. */
int vsock_open(struct vsk *v);
/* One packet to the host (payload up to VSOCK_TXBUF less the header); 0 once it is used. */
int vsock_send(struct vsk *v, u32 src_port, u32 dst_port, u16 op, u32 flags, const void *data, u32 len);
/* Next packet from the host: header and payload copied out, the buffer posted again; -1 on timeout. */
int vsock_recv(struct vsk *v, struct vsock_hdr *h, u8 *data, u64 timeout);

#endif
