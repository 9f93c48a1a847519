/*
 * xenstore: the guest's side of the VMM's XenStore. xs_wire messages travel over a
 * vsock stream to the host (CID 2), port 0x5853; there we are the VM's own domain:
 * relative paths are under our home, and the host holds us to our permissions and
 * quotas. The host test sets keys and watches ours (tests/test_xenstore.py).
 */
#include "probe.h"
#include "vdrivers.h"

#define XS_VSOCK_PORT	0x5853
#define XS_LOCAL_PORT	0x5800
#define XS_PAYLOAD_MAX	4096
#define XS_EVENTS	16

/* <xen/io/xs_wire.h> */
#define XS_READ			2
#define XS_WATCH		4
#define XS_TRANSACTION_START	6
#define XS_TRANSACTION_END	7
#define XS_WRITE		11
#define XS_RM			13
#define XS_WATCH_EVENT		15
#define XS_ERROR		16

struct xsd_sockmsg {
	u32 type, req_id, tx_id, len;
};

struct xs_event {
	char path[128], token[32];
};

struct xs {
	struct vsk v;
	int closed;
	u32 req_id;
	/* Stream bytes not yet parsed: at most a partial message and one packet. */
	u8 in[sizeof(struct xsd_sockmsg) + XS_PAYLOAD_MAX + VSOCK_RXBUF];
	u32 have;
	u8 out[sizeof(struct xsd_sockmsg) + XS_PAYLOAD_MAX];
	int replied;
	char body[XS_PAYLOAD_MAX + 1];	/* the last reply's payload, NUL-terminated */
	char err[16];			/* the last error's name */
	struct xs_event events[XS_EVENTS];	/* watch events not yet waited for */
	int n_events;
	struct xs_event event;		/* the one xs_wait_event took */
};

static int streq(const char *a, const char *b)
{
	size_t n = strlen(a);
	return n == strlen(b) && !strncmp(a, b, n);
}

static void copy_str(char *dst, const char *src, size_t size)
{
	size_t n = strlen(src);
	if (n >= size)
		n = size - 1;
	memcpy(dst, src, n);
	dst[n] = 0;
}

static void u32_to_dec(u32 v, char *out)
{
	char tmp[11];
	int n = 0;
	do
		tmp[n++] = (char)('0' + v % 10);
	while (v /= 10);
	while (n)
		*out++ = tmp[--n];
	*out = 0;
}

static u32 dec_to_u32(const char *s)
{
	u32 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u32)(*s++ - '0');
	return v;
}

/* A complete message from the stream: a watch event is queued, anything else is the reply. */
static void xs_take(struct xs *x, const struct xsd_sockmsg *m, const char *body)
{
	if (m->type == XS_WATCH_EVENT) {
		if (x->n_events == XS_EVENTS) {
			printf("probe: xenstore event queue full; an event is lost\n");
			return;
		}
		/* "path\0token\0" */
		struct xs_event *e = &x->events[x->n_events++];
		u32 n = 0;
		while (n < m->len && body[n])
			n++;
		copy_str(e->path, n < m->len ? body : "", sizeof(e->path));
		copy_str(e->token, n < m->len ? body + n + 1 : "", sizeof(e->token));
		return;
	}
	memcpy(x->body, body, m->len);
	x->body[m->len] = 0;
	if (m->type == XS_ERROR)
		copy_str(x->err, x->body, sizeof(x->err));
	x->replied = m->type == XS_ERROR ? -1 : 1;
}

/* One packet from the host into the stream; -1 on timeout or once the host ends it. */
static int xs_pump(struct xs *x)
{
	static u8 data[VSOCK_RXBUF];
	struct vsock_hdr h;

	if (x->closed || vsock_recv(&x->v, &h, data, TIMEOUT))
		return -1;
	if (h.src_port != XS_VSOCK_PORT || h.dst_port != XS_LOCAL_PORT)
		return 0;
	if (h.op == VSOCK_OP_RST || h.op == VSOCK_OP_SHUTDOWN) {
		x->closed = 1;
		return -1;
	}
	if (h.op != VSOCK_OP_RW)
		return 0;
	memcpy(x->in + x->have, data, h.len);
	x->have += h.len;
	x->v.fwd_cnt += h.len;
	for (;;) {
		struct xsd_sockmsg m;
		if (x->have < sizeof(m))
			break;
		memcpy(&m, x->in, sizeof(m));
		if (m.len > XS_PAYLOAD_MAX) {		/* the host never sends these */
			x->closed = 1;
			return -1;
		}
		u32 size = (u32)sizeof(m) + m.len;
		if (x->have < size)
			break;
		xs_take(x, &m, (const char *)x->in + sizeof(m));
		x->have -= size;
		for (u32 i = 0; i < x->have; i++)	/* forward, so overlapping is fine */
			x->in[i] = x->in[size + i];
	}
	/* Our receive credit: tell the host once it has used half of it. */
	if (x->v.fwd_cnt - x->v.fwd_sent >= VSOCK_BUF_ALLOC / 2)
		vsock_send(&x->v, XS_LOCAL_PORT, XS_VSOCK_PORT, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
	return 0;
}

/*
 * One request of parts joined as given (each part's NUL is the caller's to include);
 * NULL when it succeeds with the reply in x->body, else the error name (or "timeout").
 */
static const char *xs_call(struct xs *x, u32 type, u32 tx, const char *a, u32 alen, const char *b, u32 blen)
{
	struct xsd_sockmsg m = { type, ++x->req_id, tx, alen + blen };

	if (m.len > XS_PAYLOAD_MAX)
		return "E2BIG";
	memcpy(x->out, &m, sizeof(m));
	memcpy(x->out + sizeof(m), a, alen);
	memcpy(x->out + sizeof(m) + alen, b, blen);
	x->replied = 0;
	if (vsock_send(&x->v, XS_LOCAL_PORT, XS_VSOCK_PORT, VSOCK_OP_RW, 0, x->out, (u32)sizeof(m) + m.len))
		return "timeout";
	while (!x->replied)
		if (xs_pump(x))
			return "timeout";
	return x->replied > 0 ? NULL : x->err;
}

static const char *xs_read(struct xs *x, u32 tx, const char *path)
{
	return xs_call(x, XS_READ, tx, path, (u32)strlen(path) + 1, NULL, 0);
}

static const char *xs_write(struct xs *x, u32 tx, const char *path, const char *value)
{
	return xs_call(x, XS_WRITE, tx, path, (u32)strlen(path) + 1, value, (u32)strlen(value));
}

static const char *xs_rm(struct xs *x, u32 tx, const char *path)
{
	return xs_call(x, XS_RM, tx, path, (u32)strlen(path) + 1, NULL, 0);
}

static const char *xs_watch(struct xs *x, const char *path, const char *token)
{
	return xs_call(x, XS_WATCH, 0, path, (u32)strlen(path) + 1, token, (u32)strlen(token) + 1);
}

static const char *xs_transaction_start(struct xs *x, u32 *tx)
{
	const char *err = xs_call(x, XS_TRANSACTION_START, 0, "", 1, NULL, 0);
	*tx = err ? 0 : dec_to_u32(x->body);
	return err;
}

static const char *xs_transaction_end(struct xs *x, u32 tx, int commit)
{
	return xs_call(x, XS_TRANSACTION_END, tx, commit ? "T" : "F", 2, NULL, 0);
}

/* The next watch event with this token into x->event; -1 on timeout. */
static int xs_wait_event(struct xs *x, const char *token)
{
	for (;;) {
		for (int i = 0; i < x->n_events; i++) {
			if (!streq(x->events[i].token, token))
				continue;
			x->event = x->events[i];
			memcpy(&x->events[i], &x->events[i + 1], (u64)(x->n_events - i - 1) * sizeof(x->events[0]));
			x->n_events--;
			return 0;
		}
		if (xs_pump(x))
			return -1;
	}
}

/* Connect to the host's XenStore port: 0, or -1 without a device or when refused. */
static int xs_open(struct xs *x)
{
	struct vsock_hdr h;
	static u8 data[VSOCK_RXBUF];

	memset(x, 0, sizeof(*x));
	if (vsock_open(&x->v))
		return -1;
	vsock_send(&x->v, XS_LOCAL_PORT, XS_VSOCK_PORT, VSOCK_OP_REQUEST, 0, NULL, 0);
	while (!vsock_recv(&x->v, &h, data, TIMEOUT))
		if (h.src_port == XS_VSOCK_PORT && h.dst_port == XS_LOCAL_PORT)
			return h.op == VSOCK_OP_RESPONSE ? 0 : -1;
	return -1;
}

static void xs_close(struct xs *x)
{
	vsock_send(&x->v, XS_LOCAL_PORT, XS_VSOCK_PORT, VSOCK_OP_SHUTDOWN, 3, NULL, 0);
	virtio_reset(&x->v.dev);
}

static const char *ok_or(const char *err)
{
	return err ? err : "OK";
}

/* The five things a guest agent does with the store, and the errors it must get. */
int test_xenstore(void)
{
	static struct xs x;
	static char big[2050];
	const char *err;
	char value[16], first[16] = "";
	u32 tx, tries = 0, nodes = 0;
	int ok = 1;

	if (xs_open(&x)) {
		printf("probe: xenstore no connection\n");
		return 0;
	}
	/* 1. Watch a key the host sets once we listen; the first event is the watch's own. */
	err = xs_watch(&x, "config/ready", "ready");
	if (err || xs_wait_event(&x, "ready")) {
		printf("probe: xenstore watch %s\n", ok_or(err));
		return 0;
	}
	printf("probe: xenstore watching\n");
	do {
		if (xs_wait_event(&x, "ready")) {
			printf("probe: xenstore no event from the host\n");
			return 0;
		}
	} while (xs_read(&x, 0, "config/ready") || !streq(x.body, "1"));
	printf("probe: xenstore event path=%s\n", x.event.path);

	/* 2. Read what the host wrote for us; write a key of our own. */
	err = xs_read(&x, 0, "config/name");
	printf("probe: xenstore read config/name=%s\n", err ? err : x.body);
	ok &= !err;
	err = xs_write(&x, 0, "data/hello", "from the guest");
	printf("probe: xenstore write data/hello=%s\n", ok_or(err));
	ok &= !err;

	/* 3. Outside our home: the host's keys and another domain's are not ours. */
	printf("probe: xenstore read /vm/secret=%s\n", ok_or(xs_read(&x, 0, "/vm/secret")));
	printf("probe: xenstore write /vm/ours=%s\n", ok_or(xs_write(&x, 0, "/vm/ours", "x")));
	printf("probe: xenstore write /local/domain/0/x=%s\n", ok_or(xs_write(&x, 0, "/local/domain/0/x", "x")));

	/* 4. A transaction that a write outside it overtakes fails with EAGAIN; the retry commits. */
	ok &= !xs_write(&x, 0, "counter", "0");
	do {
		if ((err = xs_transaction_start(&x, &tx)))
			break;
		if (++tries == 1)
			xs_write(&x, 0, "counter", "10");	/* someone else's write, after our start */
		if ((err = xs_read(&x, tx, "counter")))
			break;
		if (tries == 1)
			printf("probe: xenstore transaction reads counter=%s\n", x.body);
		u32_to_dec(dec_to_u32(x.body) + 1, value);
		if ((err = xs_write(&x, tx, "counter", value)))
			break;
		err = xs_transaction_end(&x, tx, 1);
		if (tries == 1)
			copy_str(first, ok_or(err), sizeof(first));
	} while (err && streq(err, "EAGAIN") && tries < 5);
	xs_read(&x, 0, "counter");
	printf("probe: xenstore transaction first=%s tries=%u end=%s counter=%s\n", first, tries, ok_or(err), x.body);
	ok &= !err;

	/* 5. Quotas: a value over 2048 bytes; nodes past the domain's 1000. */
	memset(big, 'x', 2049);
	printf("probe: xenstore write 2049 bytes=%s\n", ok_or(xs_write(&x, 0, "big", big)));
	big[2048] = 0;
	printf("probe: xenstore write 2048 bytes=%s\n", ok_or(xs_write(&x, 0, "big", big)));
	ok &= !xs_rm(&x, 0, "big");
	u64 t0 = rdtsc();
	for (;;) {
		char path[16] = "q/";
		u32_to_dec(nodes, path + 2);
		if ((err = xs_write(&x, 0, path, "")) || ++nodes > 2000)
			break;
	}
	u64 cycles = rdtsc() - t0, hz = tsc_hz();
	printf("probe: xenstore quota nodes=%u then=%s\n", nodes, ok_or(err));
	if (hz && cycles)	/* round trips over vsock: the guest's view of the store's speed */
		printf("probe: xenstore guest writes/s=%lu\n", (u64)(nodes + 1) * hz / cycles);
	ok &= !xs_rm(&x, 0, "q");
	err = xs_write(&x, 0, "q/again", "");
	printf("probe: xenstore after rm=%s\n", ok_or(err));
	ok &= !err;
	xs_close(&x);
	return ok;
}
