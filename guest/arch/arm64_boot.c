/*
 * The arm64 side of the probe: entered from arch/arm64_head.S as a Linux arm64
 * Image (Documentation/arch/arm64/booting.rst) with x0 = the device tree blob,
 * it learns everything from the device tree (Devicetree Specification 0.4 and
 * the Linux bindings it names), reports it, runs the tests (run.c) and powers
 * off through PSCI (DEN0022 PSCI 1.1).
 */
#include "../probe.h"
#include "../fdt.h"

#define BOOT_TIMER_MMIO	0x090c0000UL	/* x86's port 0x3ff; unassigned on QEMU virt */
#define MMIO_GAP_PROBE	0x0b000000UL	/* between the virtio-mmio transports and the platform bus */
#define MPIDR_AFF_MASK	0xff00ffffffUL	/* Aff3, Aff2, Aff1, Aff0 (Arm ARM D17.2.101) */

struct boot_info boot;
struct dt_info dt;

static char cmdline[2048];
static u32 root_addr_cells = 2, root_size_cells = 1;

extern char _start[], _end[];
extern void secondary_entry(void);

/* One node of the tree: keep what the probe uses (Devicetree Specification 0.4, 3). */
static void visit(u64 fdt, u64 node, u64 parent, u32 depth)
{
	u32 len, ac, sc;
	const void *v;
	const char *name = fdt_name(node);

	if (depth == 0) {
		root_addr_cells = fdt_prop_u32(fdt, node, "#address-cells", 2);
		root_size_cells = fdt_prop_u32(fdt, node, "#size-cells", 1);
		return;
	}
	ac = fdt_prop_u32(fdt, parent, "#address-cells", 2);
	sc = fdt_prop_u32(fdt, parent, "#size-cells", 1);
	v = fdt_prop(fdt, node, "status", &len);
	if (v && strncmp(v, "okay", 5) && strncmp(v, "ok", 3))
		return;		/* "disabled" and the like */

	if (depth == 1 && !strncmp(name, "chosen", 7)) {
		/* 3.6: /chosen; Linux's chosen.yaml for the initrd */
		if ((v = fdt_prop(fdt, node, "bootargs", &len))) {
			size_t n = strlen(v);
			if (n > sizeof(cmdline) - 1)
				n = sizeof(cmdline) - 1;
			memcpy(cmdline, v, n);
			cmdline[n] = 0;
			dt.have_bootargs = 1;
		}
		u32 slen, elen;
		const void *s = fdt_prop(fdt, node, "linux,initrd-start", &slen);
		const void *e = fdt_prop(fdt, node, "linux,initrd-end", &elen);
		if (s && e && (slen == 4 || slen == 8) && (elen == 4 || elen == 8)) {
			boot.initrd = fdt_cells(s, slen / 4);
			boot.initrd_size = fdt_cells(e, elen / 4) - boot.initrd;
		}
		return;
	}
	if (depth == 1 && fdt_prop_has(fdt, node, "device_type", "memory")) {
		/* 3.4: /memory, reg = (address, size) pairs in the root's cells */
		u32 pair = 4 * (root_addr_cells + root_size_cells);
		if (!(v = fdt_prop(fdt, node, "reg", &len)) || root_addr_cells > 2 || root_size_cells > 2)
			return;
		for (u32 off = 0; off + pair <= len && dt.n_mem < DT_MAX_MEM; off += pair) {
			const u8 *p = (const u8 *)v + off;
			dt.mem[dt.n_mem].base = fdt_cells(p, root_addr_cells);
			dt.mem[dt.n_mem].size = fdt_cells(p + 4 * root_addr_cells, root_size_cells);
			if (dt.mem[dt.n_mem].size)
				dt.n_mem++;
		}
		return;
	}
	if (depth == 2 && fdt_prop_has(fdt, node, "device_type", "cpu")) {
		/* 3.7 and Linux's arm/cpus.yaml: reg is the MPIDR affinity, in /cpus' #address-cells */
		if ((v = fdt_prop(fdt, node, "reg", &len)) && len >= 4 * ac && ac && ac <= 2 &&
		    dt.n_cpus < DT_MAX_CPUS)
			dt.mpidr[dt.n_cpus++] = fdt_cells(v, ac);
		return;
	}
	if (fdt_prop_has(fdt, node, "compatible", "arm,psci") ||
	    fdt_prop_has(fdt, node, "compatible", "arm,psci-0.2") ||
	    fdt_prop_has(fdt, node, "compatible", "arm,psci-1.0")) {
		/* Linux's arm/psci.yaml */
		if (fdt_prop_has(fdt, node, "method", "hvc"))
			dt.psci = PSCI_METHOD_HVC;
		else if (fdt_prop_has(fdt, node, "method", "smc"))
			dt.psci = PSCI_METHOD_SMC;
		return;
	}
	if (ac > 2 || sc > 2 || !(v = fdt_prop(fdt, node, "reg", &len)) || len < 4 * (ac + sc))
		return;		/* the rest are devices: an address is what we need */
	u64 base = fdt_cells(v, ac);
	if (fdt_prop_has(fdt, node, "compatible", "virtio,mmio") && dt.n_virtio < DT_MAX_VIRTIO) {
		/* Linux's virtio/mmio.yaml; interrupts as the GIC binding's 3 cells: type, number, flags */
		u32 intid = 0;
		if ((v = fdt_prop(fdt, node, "interrupts", &len)) && len == 12)
			intid = fdt_be32(v) == 0 ? 32 + fdt_be32((const u32 *)v + 1) : 16 + fdt_be32((const u32 *)v + 1);
		dt.virtio[dt.n_virtio].base = base;
		dt.virtio[dt.n_virtio].irq = intid;
		dt.n_virtio++;
	} else if (fdt_prop_has(fdt, node, "compatible", "arm,pl011") && !dt.uart) {
		dt.uart = base;
	} else if (fdt_prop_has(fdt, node, "compatible", "microsoft,vmgenid")) {
		dt.vmgenid = base;
	}
}

static int parse_dt(u64 fdt)
{
	if (fdt_check(fdt)) {
		printf("probe: error no device tree at 0x%lx (x0)\n", fdt);
		return -1;
	}
	dt.addr = fdt;
	dt.size = fdt_totalsize(fdt);
	if (fdt_walk(fdt, visit)) {
		printf("probe: error the device tree at 0x%lx is malformed\n", fdt);
		return -1;
	}
	boot.cmdline = cmdline;
	for (u32 i = 0; i < dt.n_mem; i++)
		boot.ram += dt.mem[i].size;
	return 0;
}

static u64 my_mpidr(void)
{
	return read_sysreg(mpidr_el1) & MPIDR_AFF_MASK;
}

static const char *const psci_names[] = { "none", "hvc", "smc" };

static void report_boot(void)
{
	long v = psci_call(PSCI_VERSION, 0, 0, 0);

	printf("probe: boot=image load=0x%lx\n", boot.load);
	printf("probe: dtb 0x%lx totalsize=0x%lx version=%u el=%lu\n", dt.addr, dt.size, fdt_version(dt.addr),
	       read_sysreg(CurrentEL) >> 2 & 3);
	printf("probe: cmdline=%s\n", boot.cmdline);
	for (u32 i = 0; i < dt.n_mem; i++)
		printf("probe: memory 0x%lx 0x%lx\n", dt.mem[i].base, dt.mem[i].size);
	printf("probe: ram=%lu\n", boot.ram);
	printf("probe: cpus count=%u bsp=0x%lx psci=%s psci-version=%ld.%ld timer-hz=%lu\n", dt.n_cpus,
	       my_mpidr(), psci_names[dt.psci], v < 0 ? v : v >> 16, v < 0 ? 0 : v & 0xffff, timer_hz());
	printf("probe: uart pl011 0x%lx\n", dt.uart);
	for (u32 i = 0; i < dt.n_virtio; i++) {
		u32 id = rd32(dt.virtio[i].base + 8);	/* DeviceID; 0: an empty transport */
		if (id)
			printf("probe: virtio-mmio 0x%lx irq=%u id=%u\n", dt.virtio[i].base, dt.virtio[i].irq, id);
	}
	/* An access nobody decodes: QEMU aborts (the handler skips it), a VMM sees an MMIO exit. */
	wr32(MMIO_GAP_PROBE, 0x12345678);
	printf("probe: mmio-gap read=0x%x\n", rd32(MMIO_GAP_PROBE));
	if (boot.initrd_size)
		printf("probe: initrd addr=0x%lx size=%lu crc32=0x%x\n", boot.initrd, boot.initrd_size,
		       crc32((const u8 *)boot.initrd, boot.initrd_size));
	else
		printf("probe: initrd none\n");
}

static int in_ram(u64 base, u64 size)
{
	for (u32 i = 0; i < dt.n_mem; i++)
		if (base >= dt.mem[i].base && base + size <= dt.mem[i].base + dt.mem[i].size)
			return 1;
	return 0;
}

/* info: the device tree must describe this machine consistently. */
int test_info(void)
{
	int ok = 1;

	for (u32 i = 0; i < dt.n_mem; i++)
		for (u32 j = i + 1; j < dt.n_mem; j++)
			if (dt.mem[i].base < dt.mem[j].base + dt.mem[j].size &&
			    dt.mem[j].base < dt.mem[i].base + dt.mem[i].size) {
				printf("probe: info memory ranges %u and %u overlap\n", i, j);
				ok = 0;
			}
	if (!boot.ram) {
		printf("probe: info no /memory node\n");
		ok = 0;
	}
	if (!in_ram(boot.load, (u64)(_end - _start))) {
		printf("probe: info the image is not in RAM\n");
		ok = 0;
	}
	if (!in_ram(RAM_BASE + (32UL << 20), 64UL << 20)) {
		printf("probe: info no RAM for the virtio buffers at 0x%lx\n", RAM_BASE + (32UL << 20));
		ok = 0;
	}
	if (boot.initrd_size && !in_ram(boot.initrd, boot.initrd_size)) {
		printf("probe: info the initrd is not in RAM\n");
		ok = 0;
	}
	if (!dt.have_bootargs) {
		printf("probe: info /chosen has no bootargs\n");
		ok = 0;
	}
	if (!dt.n_cpus) {
		printf("probe: info no cpu nodes\n");
		ok = 0;
	}
	int bsp_listed = 0;
	for (u32 i = 0; i < dt.n_cpus; i++)
		bsp_listed |= dt.mpidr[i] == my_mpidr();
	if (dt.n_cpus && !bsp_listed) {
		printf("probe: info the boot CPU 0x%lx is not among the cpu nodes\n", my_mpidr());
		ok = 0;
	}
	if (dt.psci == PSCI_METHOD_NONE) {
		printf("probe: info no /psci node with method hvc or smc\n");
		ok = 0;
	}
	if (!dt.uart) {
		printf("probe: info no arm,pl011 node\n");
		ok = 0;
	}
	return ok;
}

/* smp: PSCI CPU_ON (PSCI 1.1, 5.6) every secondary, one at a time, and let each report. */
static volatile u32 ap_reported;

void ap_main(u64 ordinal)
{
	printf("probe: ap %lu mpidr=0x%lx up\n", ordinal, my_mpidr());
	ap_reported = (u32)ordinal;
}

int test_smp(void)
{
	u32 up = 1, ordinal = 0;
	u64 bsp = my_mpidr();

	for (u32 i = 0; i < dt.n_cpus && i < DT_MAX_CPUS; i++) {
		if (dt.mpidr[i] == bsp)
			continue;
		ordinal++;
		/* no atomics with the MMU off: one CPU starts at a time, and only it writes ap_reported */
		long ret = psci_call(PSCI_CPU_ON, dt.mpidr[i], (u64)secondary_entry, ordinal);
		if (ret) {
			printf("probe: smp cpu_on mpidr=0x%lx failed ret=%ld\n", dt.mpidr[i], ret);
			continue;
		}
		u64 t0 = rdtsc();
		while (ap_reported != ordinal && rdtsc() - t0 < 10 * timer_hz())
			cpu_relax();
		if (ap_reported == ordinal)
			up++;
		else
			printf("probe: smp mpidr=0x%lx never reported\n", dt.mpidr[i]);
	}
	printf("probe: smp cpus=%u expected=%u bsp=0x%lx\n", up, dt.n_cpus, bsp);
	return up == dt.n_cpus;
}

void probe_main(u64 fdt, u64 load)
{
	int ok;

	boot.path = BOOT_IMAGE;
	boot.load = load;
	ok = parse_dt(fdt) == 0;
	serial_init();		/* where the device tree says */
	if (ok)
		report_boot();
	wr32(BOOT_TIMER_MMIO, 2);
	printf("probe: boottimer 1 2\n");
	probe_run(ok);
}
