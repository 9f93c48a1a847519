/*
 * tcp: bulk TCP transfers for the Linux test guest, the way iperf moves data: large writes
 * and reads, so a figure measures the network path, not the tool. (busybox nc moves 1 KiB
 * per system call, and then a slow guest measures mostly its own system calls.)
 *
 *   tcp send HOST PORT BYTES     connect, write BYTES zero bytes in 64 KiB writes, half-close,
 *                                wait for the peer to close
 *   tcp recv [-b] PORT           accept one connection, read it to the end, print the bytes
 *                                read; -b returns once listening, receiving in the background
 *
 * Errors are one line on stderr and exit status 1; usage errors exit 2.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BLOCK 65536

static char buf[BLOCK];

static void die(const char *what)
{
	fprintf(stderr, "tcp: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fputs("usage: tcp send HOST PORT BYTES | recv [-b] PORT\n", stderr);
	exit(2);
}

static unsigned long long parse_num(const char *s, unsigned long long max)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);
	if (*s == '\0' || *end != '\0' || v > max)
		usage();
	return v;
}

/* Read to the end of the stream; returns the bytes read. */
static unsigned long long drain(int sock)
{
	unsigned long long total = 0;
	for (;;) {
		ssize_t n = read(sock, buf, sizeof buf);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read");
		if (n == 0)
			return total;
		total += (unsigned long long)n;
	}
}

static void send_bytes(const char *host, unsigned port, unsigned long long bytes)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
		usage();
	int sock = socket(AF_INET, SOCK_STREAM, 0);
	if (sock < 0)
		die("socket");
	if (connect(sock, (struct sockaddr *)&a, sizeof a) < 0)
		die("connect");
	while (bytes > 0) {
		size_t len = bytes < sizeof buf ? (size_t)bytes : sizeof buf;
		ssize_t n = write(sock, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("write");
		bytes -= (unsigned long long)n;
	}
	if (shutdown(sock, SHUT_WR) < 0)
		die("shutdown");
	drain(sock);
}

static void recv_bytes(unsigned port, int background)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port),
				 .sin_addr = { htonl(INADDR_ANY) } };
	int one = 1, lsock = socket(AF_INET, SOCK_STREAM, 0);
	if (lsock < 0)
		die("socket");
	setsockopt(lsock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(lsock, (struct sockaddr *)&a, sizeof a) < 0 || listen(lsock, 1) < 0)
		die("listen");
	if (background) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid > 0)
			exit(0);
	}
	int sock = accept(lsock, NULL, NULL);
	if (sock < 0)
		die("accept");
	printf("%llu\n", drain(sock));
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "send") == 0)
		send_bytes(argv[2], (unsigned)parse_num(argv[3], 65535), parse_num(argv[4], ~0ULL));
	else if (argc == 3 && strcmp(argv[1], "recv") == 0)
		recv_bytes((unsigned)parse_num(argv[2], 65535), 0);
	else if (argc == 4 && strcmp(argv[1], "recv") == 0 && strcmp(argv[2], "-b") == 0)
		recv_bytes((unsigned)parse_num(argv[3], 65535), 1);
	else
		usage();
	return 0;
}
