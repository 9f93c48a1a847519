/*
 * The probe's test runner, the same on every architecture: runs the tests that
 * probe.run=a,b,... names on the command line (only "info" without one), prints
 * "probe: test NAME ok|fail" for each and "probe: done ok|fail", and powers off.
 */
#include "probe.h"

/* The value of "key=" on the command line, up to the next space, or NULL. */
const char *cmdline_arg(const char *key, size_t *len)
{
	size_t klen = strlen(key);
	const char *p = boot.cmdline;

	while (p && *p) {
		while (*p == ' ')
			p++;
		if (!strncmp(p, key, klen) && p[klen] == '=') {
			const char *v = p + klen + 1;
			*len = 0;
			while (v[*len] && v[*len] != ' ')
				(*len)++;
			return v;
		}
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}

/* echo: read one line from the serial console (COM1, the PL011) and print it back. */
static int test_echo(void)
{
	char line[128];

	printf("probe: echo ready\n");
	serial_getline(line, sizeof(line));
	printf("probe: echo %s\n", line);
	return 1;
}

/*
 * wait: count forever, for tests that stop or pause the VM from the host;
 * they watch wait_counter in guest RAM to see whether the vCPU runs.
 */
volatile u64 wait_counter;

static int test_wait(void)
{
	printf("probe: waiting\n");
	for (;;) {
		wait_counter++;
		cpu_relax();
	}
	return 0;
}

/* idle: halt for good, as an idle guest's CPU does (it costs its host nothing: bench/density.py). */
static int test_idle(void)
{
	printf("probe: idle\n");
	for (;;) {
#ifdef __x86_64__
		__asm__ volatile("cli; hlt");
#else
		__asm__ volatile("wfi");
#endif
	}
	return 0;
}

static const struct {
	const char *name;
	int (*fn)(void);
} tests[] = {
	{ "info", test_info },
	{ "smp", test_smp },
	{ "echo", test_echo },
	{ "wait", test_wait },
	{ "idle", test_idle },
#ifdef __x86_64__
	{ "triplefault", test_triplefault },
	{ "keyboard", test_keyboard },
	{ "acpi", test_acpi },
	{ "acpi-power", test_acpi_power },
#endif
	{ "rng", test_rng },
	{ "fs", test_fs },
	{ "rng-rate", test_rng_rate },
	{ "blk", test_blk },
	{ "virtio-abuse", test_virtio_abuse },
	{ "blkbench", test_blkbench },
	{ "console", test_console },
	{ "net", test_net },
	{ "vsock", test_vsock },
	{ "netbench", test_netbench },
	{ "net-big", test_net_big },
	{ "hotplug", test_hotplug },
	{ "xenstore", test_xenstore },
	{ "snapshot", test_snapshot },
};

static int run_test(const char *name, size_t len)
{
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		if (strlen(tests[i].name) == len && !strncmp(tests[i].name, name, len)) {
			int ok = tests[i].fn();
			printf("probe: test %s %s\n", tests[i].name, ok ? "ok" : "fail");
			return ok;
		}
	}
	printf("probe: test ");
	serial_write(name, len);
	printf(" unknown\n");
	return 0;
}

/* Every test runs; any failure fails the run. Nothing runs after a failed boot. */
void probe_run(int boot_ok)
{
	int ok = boot_ok;
	size_t len = 0;
	const char *run = boot_ok ? cmdline_arg("probe.run", &len) : NULL;

	if (!run) {
		run = "info";
		len = 4;
	}
	while (boot_ok && len) {
		size_t n = 0;
		while (n < len && run[n] != ',')
			n++;
		ok &= run_test(run, n);
		if (n < len)
			n++;
		run += n;
		len -= n;
	}
	printf("probe: done %s\n", ok ? "ok" : "fail");
	poweroff();
}
