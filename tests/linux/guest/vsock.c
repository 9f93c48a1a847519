/*
 * vsock: AF_VSOCK stream tool for the Linux test guest.
 *
 *   vsock cid                         print this guest's CID
 *   vsock connect CID PORT            connect, then relay stdin -> peer and peer -> stdout
 *   vsock listen [-b] [-e] [-n N] PORT
 *                                     accept N connections one after another (default 1, 0:
 *                                     forever) and relay each as above, or echo with -e;
 *                                     -b returns once listening, serving in the background
 *
 * Relaying ends once both directions have: end of stdin half-closes our side (SHUT_WR) so the
 * peer sees EOF but can still answer, and the peer's EOF ends the other direction. A peer that
 * closes completely ends the sending too. Echoing ends at the peer's EOF. Errors are one line on
 * stderr and exit status 1.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>

static void die(const char *what)
{
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fputs("usage: vsock cid | connect CID PORT | listen [-b] [-e] [-n N] PORT\n", stderr);
	exit(2);
}

static unsigned parse_u32(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);
	if (*s == '\0' || *end != '\0' || v > 0xffffffffUL)
		usage();
	return (unsigned)v;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Copy stdin to sock and sock to stdout until both are done (or echo sock to itself). */
static void relay(int sock, int echo)
{
	static char buf[65536];
	int in_open = !echo, peer_open = 1;
	while (peer_open || in_open) {
		struct pollfd p[2] = { { peer_open ? sock : -1, POLLIN, 0 }, { in_open ? 0 : -1, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents) {
			ssize_t n = read(sock, buf, sizeof buf);
			if (n < 0 && errno != ECONNRESET)
				die("read socket");
			if (n <= 0)
				peer_open = 0;
			else if (write_all(echo ? sock : 1, buf, (size_t)n) < 0)
				die(echo ? "write socket" : "write stdout");
			if (!peer_open && echo)
				return;
		}
		if (p[1].revents) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n < 0)
				die("read stdin");
			if (n == 0) {
				in_open = 0;
				shutdown(sock, SHUT_WR);
			} else if (write_all(sock, buf, (size_t)n) < 0) {
				if (errno != EPIPE && errno != ECONNRESET)
					die("write socket");
				in_open = 0;	/* the peer is gone: nobody to send to */
			}
		}
	}
}

static int cmd_cid(void)
{
	unsigned cid;
	int fd = open("/dev/vsock", O_RDONLY);
	if (fd < 0)
		die("/dev/vsock");
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		die("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
	printf("%u\n", cid);
	return 0;
}

static int cmd_connect(unsigned cid, unsigned port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (sock < 0)
		die("socket");
	if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("connect");
	relay(sock, 0);
	return 0;
}

static int cmd_listen(unsigned port, int background, int echo, unsigned count)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (sock < 0)
		die("socket");
	if (bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("bind");
	if (listen(sock, 8) < 0)
		die("listen");
	if (background) {
		/* the caller may connect as soon as we return: the socket already listens */
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid > 0) {
			/* on stderr: stdout may be the file that receives the data */
			fprintf(stderr, "vsock: listening on port %u (pid %d)\n", port, (int)pid);
			return 0;
		}
		setsid();
	}
	for (unsigned served = 0; count == 0 || served < count; served++) {
		int conn = accept(sock, NULL, NULL);
		if (conn < 0)
			die("accept");
		relay(conn, echo);
		close(conn);
	}
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);	/* a closed peer is an EPIPE to handle, not a death */
	if (argc >= 2 && strcmp(argv[1], "cid") == 0 && argc == 2)
		return cmd_cid();
	if (argc == 4 && strcmp(argv[1], "connect") == 0)
		return cmd_connect(parse_u32(argv[2]), parse_u32(argv[3]));
	if (argc >= 3 && strcmp(argv[1], "listen") == 0) {
		int background = 0, echo = 0;
		unsigned count = 1;
		int i = 2;
		for (; i < argc - 1; i++) {
			if (strcmp(argv[i], "-b") == 0)
				background = 1;
			else if (strcmp(argv[i], "-e") == 0)
				echo = 1;
			else if (strcmp(argv[i], "-n") == 0 && i + 1 < argc - 1)
				count = parse_u32(argv[++i]);
			else
				usage();
		}
		return cmd_listen(parse_u32(argv[argc - 1]), background, echo, count);
	}
	usage();
	return 2;
}
