/*
 * xs: XenStore client for the Linux test guest, over vsock to the VMM's embedded XenStore
 * (host CID 2, port 22611 unless XS_PORT is set), speaking Xen's xs_wire protocol: a header of
 * four little-endian u32 {type, req_id, tx_id, len} then len bytes of payload.
 *
 *   xs read PATH            print the value
 *   xs write PATH VALUE
 *   xs ls PATH              print the children, one a line
 *   xs rm PATH
 *   xs mkdir PATH
 *   xs perms PATH           print the permission entries, one a line ("n0", "r1", ...)
 *   xs watch PATH [N]       print "PATH TOKEN" for each of N watch events (default 1; the first
 *                           is the one Xen sends when the watch is set), then exit
 *
 * On an error reply it prints "xs: NAME" (EACCES, ENOENT, ...) on stderr and exits 1; usage
 * errors exit 2. XS_FD=N makes it use the connected stream on file descriptor N instead of
 * vsock: that lets the host test this client against the store without a VM.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

/* Message types, as numbered in xen/include/public/io/xs_wire.h. */
enum { XS_DIRECTORY = 1, XS_READ = 2, XS_GET_PERMS = 3, XS_WATCH = 4, XS_WRITE = 11,
       XS_MKDIR = 12, XS_RM = 13, XS_WATCH_EVENT = 15, XS_ERROR = 16 };
#define XS_PAYLOAD_MAX 4096
#define XS_DEFAULT_PORT 22611

struct msg {
	uint32_t type, req_id, tx_id, len;
	char body[XS_PAYLOAD_MAX + 1];	/* +1: always NUL-terminated for printing */
};

static void die(const char *what)
{
	fprintf(stderr, "xs: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fputs("usage: xs read|ls|rm|mkdir|perms PATH | write PATH VALUE | watch PATH [N]\n", stderr);
	exit(2);
}

static void io_all(int fd, void *buf, size_t len, int writing)
{
	char *p = buf;
	while (len > 0) {
		ssize_t n = writing ? write(fd, p, len) : read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die(writing ? "write" : "read");
		if (n == 0) {
			fputs("xs: connection closed by the XenStore\n", stderr);
			exit(1);
		}
		p += n;
		len -= (size_t)n;
	}
}

static int xs_connect(void)
{
	if (getenv("XS_FD"))
		return atoi(getenv("XS_FD"));
	const char *env = getenv("XS_PORT");
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
				    .svm_port = env ? (unsigned)strtoul(env, NULL, 0) : XS_DEFAULT_PORT };
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("connect");
	return fd;
}

/* Header fields are little-endian on the wire; x86 and every guest we run are too. */
static void send_msg(int fd, uint32_t type, const char *a, size_t alen, const char *b, size_t blen)
{
	static uint32_t req_id;
	uint32_t hdr[4] = { type, ++req_id, 0, (uint32_t)(alen + blen) };
	if (alen + blen > XS_PAYLOAD_MAX) {
		fputs("xs: request too long\n", stderr);
		exit(2);
	}
	io_all(fd, hdr, sizeof hdr, 1);
	io_all(fd, (void *)a, alen, 1);
	io_all(fd, (void *)b, blen, 1);
}

static void recv_msg(int fd, struct msg *m)
{
	uint32_t hdr[4];
	io_all(fd, hdr, sizeof hdr, 0);
	m->type = hdr[0];
	m->req_id = hdr[1];
	m->tx_id = hdr[2];
	m->len = hdr[3];
	if (m->len > XS_PAYLOAD_MAX) {
		fprintf(stderr, "xs: reply of %u bytes is over the protocol's limit\n", m->len);
		exit(1);
	}
	io_all(fd, m->body, m->len, 0);
	m->body[m->len] = '\0';
}

/* The reply to the request just sent; watch events that come first are skipped. */
static void reply(int fd, uint32_t type, struct msg *m)
{
	do
		recv_msg(fd, m);
	while (m->type == XS_WATCH_EVENT && type != XS_WATCH_EVENT);
	if (m->type == XS_ERROR) {
		fprintf(stderr, "xs: %s\n", m->body);
		exit(1);
	}
	if (m->type != type) {
		fprintf(stderr, "xs: reply of type %u to a request of type %u\n", m->type, type);
		exit(1);
	}
}

/* Print a payload of NUL-terminated strings one a line. */
static void print_list(const struct msg *m)
{
	for (uint32_t off = 0; off < m->len; off += (uint32_t)strlen(m->body + off) + 1)
		if (m->body[off] != '\0' || off + 1 < m->len)
			printf("%s\n", m->body + off);
}

int main(int argc, char **argv)
{
	static struct msg m;
	if (argc < 3)
		usage();
	const char *op = argv[1], *path = argv[2];
	size_t plen = strlen(path) + 1;		/* paths go with their NUL */
	int simple = strcmp(op, "rm") == 0 ? XS_RM : strcmp(op, "mkdir") == 0 ? XS_MKDIR : 0;
	int fd = xs_connect();

	if (strcmp(op, "read") == 0 && argc == 3) {
		send_msg(fd, XS_READ, path, plen, NULL, 0);
		reply(fd, XS_READ, &m);
		printf("%s\n", m.body);
	} else if (strcmp(op, "write") == 0 && argc == 4) {
		send_msg(fd, XS_WRITE, path, plen, argv[3], strlen(argv[3]));	/* value: no NUL */
		reply(fd, XS_WRITE, &m);
	} else if ((strcmp(op, "ls") == 0 || strcmp(op, "perms") == 0) && argc == 3) {
		uint32_t type = op[0] == 'l' ? XS_DIRECTORY : XS_GET_PERMS;
		send_msg(fd, type, path, plen, NULL, 0);
		reply(fd, type, &m);
		print_list(&m);
	} else if (simple && argc == 3) {
		send_msg(fd, (uint32_t)simple, path, plen, NULL, 0);
		reply(fd, (uint32_t)simple, &m);
	} else if (strcmp(op, "watch") == 0 && (argc == 3 || argc == 4)) {
		long count = argc == 4 ? strtol(argv[3], NULL, 0) : 1;
		send_msg(fd, XS_WATCH, path, plen, "xs-token", sizeof "xs-token");
		reply(fd, XS_WATCH, &m);
		for (long seen = 0; seen < count; seen++) {
			reply(fd, XS_WATCH_EVENT, &m);
			printf("%s %s\n", m.body, m.body + strlen(m.body) + 1);
			fflush(stdout);
		}
	} else {
		usage();
	}
	close(fd);
	return 0;
}
