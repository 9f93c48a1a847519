/*
 * dirty: keep a guest writing its memory while it is migrated, and check afterwards that
 * every page arrived.
 *
 *   dirty MIB MBPS   rewrite MIB MiB, page after page, at about MBPS MB/s; each 4 KiB page
 *                    gets the number of page writes done so far. On SIGTERM, check that
 *                    every page holds what its last write put there, print
 *                    "dirty ok pages=N writes=W" (or "dirty bad page=P got=G want=W") and
 *                    exit 0 (1 if bad).
 *
 * Usage errors exit 2.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define BURST 256			/* pages written between looks at the clock */

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 3 || atol(argv[1]) <= 0 || atol(argv[2]) <= 0) {
		fprintf(stderr, "usage: dirty MIB MBPS\n");
		return 2;
	}
	uint64_t pages = (uint64_t)atol(argv[1]) * (1 << 20) / PAGE;
	double rate = atol(argv[2]) * 1e6 / PAGE;		/* pages a second */
	uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("dirty: mmap");
		return 1;
	}
	signal(SIGTERM, on_term);
	uint64_t written = 0;
	double start = now();
	while (!stop) {
		for (int i = 0; i < BURST; i++, written++)
			*(volatile uint64_t *)(mem + (written % pages) * PAGE) = written + 1;
		double ahead = written / rate - (now() - start);
		if (ahead > 0) {
			struct timespec ts = { (time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9) };
			nanosleep(&ts, NULL);
		}
	}
	for (uint64_t p = 0; p < pages && p < written; p++) {
		uint64_t last = written - 1 - ((written - 1 - p) % pages);
		uint64_t got = *(volatile uint64_t *)(mem + p * PAGE);
		if (got != last + 1) {
			printf("dirty bad page=%llu got=%llu want=%llu\n", (unsigned long long)p,
			       (unsigned long long)got, (unsigned long long)(last + 1));
			return 1;
		}
	}
	printf("dirty ok pages=%llu writes=%llu\n", (unsigned long long)pages, (unsigned long long)written);
	return 0;
}
