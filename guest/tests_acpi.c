/*
 * ACPI tests: the tables as a guest OS finds them (ACPI 6.4, 5.2), and the
 * hardware-reduced power button and soft-off path.
 *
 * acpi: find the RSDP by scanning the BIOS area as Linux does and compare it
 * with the one the boot protocol named; check every table's checksum; report
 * the FADT's flags and sleep register, the MADT's enabled processors and the
 * DSDT's virtio-mmio devices (_HID "LNRO0005").
 *
 * acpi-power: wait for the power button on the Generic Event Device's event
 * register (at the port of the DSDT's "EREG" OperationRegion), then write
 * SLP_TYP (from _S5_) | SLP_EN to the FADT's sleep control register, as an
 * OS's poweroff does. Nothing prints after that if the VMM powers off.
 */
#include "lib.h"
#include "probe.h"

#define SDT_HEADER	36
#define FADT_FLAGS	112
#define FADT_X_DSDT	140
#define FADT_SLEEP_CTL	244	/* Generic Address Structure: space id, ..., address at +4 */
#define FADT_HW_REDUCED	(1u << 20)
#define MADT_ENTRIES	44
#define GAS_SYSTEM_IO	1
#define SLP_EN		0x20

struct acpi_info {
	u64 rsdp, fadt, madt, dsdt;
	u32 tables, bad_checksums;
};

static int checksum_ok(u64 addr, u32 len)
{
	u8 sum = 0;

	for (u32 i = 0; i < len; i++)
		sum += rd8(addr + i);
	return sum == 0;
}

static u64 find_rsdp(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8) && checksum_ok(a, 20))
			return a;
	return 0;
}

static int walk_tables(struct acpi_info *acpi)
{
	u64 xsdt;
	u32 n;

	acpi->rsdp = find_rsdp();
	if (!acpi->rsdp) {
		printf("probe: acpi no rsdp in 0xe0000-0xfffff\n");
		return 0;
	}
	xsdt = rd64(acpi->rsdp + 24);
	printf("probe: acpi rsdp=0x%lx boot-rsdp=0x%lx revision=%u extended-checksum=%s\n", acpi->rsdp,
	       boot.rsdp, rd8(acpi->rsdp + 15), checksum_ok(acpi->rsdp, rd32(acpi->rsdp + 20)) ? "ok" : "bad");
	if (memcmp((const void *)xsdt, "XSDT", 4)) {
		printf("probe: acpi no xsdt at 0x%lx\n", xsdt);
		return 0;
	}
	n = (rd32(xsdt + 4) - SDT_HEADER) / 8;
	acpi->bad_checksums = !checksum_ok(xsdt, rd32(xsdt + 4));
	for (u32 i = 0; i < n; i++) {
		u64 t = rd64(xsdt + SDT_HEADER + 8 * i);
		int ok = checksum_ok(t, rd32(t + 4));

		acpi->tables++;
		acpi->bad_checksums += !ok;
		printf("probe: acpi table %c%c%c%c at 0x%lx length=%u checksum=%s\n", rd8(t), rd8(t + 1),
		       rd8(t + 2), rd8(t + 3), t, rd32(t + 4), ok ? "ok" : "bad");
		if (!memcmp((const void *)t, "FACP", 4))
			acpi->fadt = t;
		else if (!memcmp((const void *)t, "APIC", 4))
			acpi->madt = t;
	}
	if (!acpi->fadt || !acpi->madt)
		return 0;
	acpi->dsdt = rd64(acpi->fadt + FADT_X_DSDT);
	acpi->bad_checksums += !checksum_ok(acpi->dsdt, rd32(acpi->dsdt + 4));
	return 1;
}

static u32 count_in_dsdt(const struct acpi_info *acpi, const char *what, size_t len)
{
	u32 count = 0, end = rd32(acpi->dsdt + 4);

	for (u32 i = SDT_HEADER; i + len <= end; i++)
		count += !memcmp((const void *)(acpi->dsdt + i), what, len);
	return count;
}

/* The address just after the first occurrence of "what" in the DSDT, or 0. */
static u64 dsdt_find(const struct acpi_info *acpi, const char *what, size_t len)
{
	u32 end = rd32(acpi->dsdt + 4);

	for (u32 i = SDT_HEADER; i + len + 3 <= end; i++)
		if (!memcmp((const void *)(acpi->dsdt + i), what, len))
			return acpi->dsdt + i + len;
	return 0;
}

/* An AML integer: Zero, One, ByteConst or WordConst; -1 for anything else. */
static long aml_integer(u64 p)
{
	switch (p ? rd8(p) : 0xff) {
	case 0x00: return 0;
	case 0x01: return 1;
	case 0x0a: return rd8(p + 1);
	case 0x0b: return rd16(p + 1);
	}
	return -1;
}

static u32 madt_cpus(const struct acpi_info *acpi)
{
	u32 cpus = 0, end = rd32(acpi->madt + 4);

	for (u32 off = MADT_ENTRIES; off + 2 <= end && rd8(acpi->madt + off + 1); off += rd8(acpi->madt + off + 1))
		if (rd8(acpi->madt + off) == 0 && (rd32(acpi->madt + off + 4) & 1))
			cpus++;
	return cpus;
}

int test_acpi(void)
{
	struct acpi_info acpi = { 0 };

	if (!walk_tables(&acpi))
		return 0;
	printf("probe: acpi fadt hw-reduced=%u sleep-space=%u sleep-port=0x%lx madt-cpus=%u dsdt-virtio=%u"
	       " checksums=%s\n", !!(rd32(acpi.fadt + FADT_FLAGS) & FADT_HW_REDUCED),
	       rd8(acpi.fadt + FADT_SLEEP_CTL), rd64(acpi.fadt + FADT_SLEEP_CTL + 4), madt_cpus(&acpi),
	       count_in_dsdt(&acpi, "LNRO0005", 8), acpi.bad_checksums ? "bad" : "ok");
	return acpi.rsdp == boot.rsdp && !acpi.bad_checksums;
}

int test_acpi_power(void)
{
	/* AML: OperationRegion (EREG, SystemIO, port, ...) and Name (_S5_, Package (n) {typ, ...}) */
	static const char ereg[] = { 0x5b, (char)0x80, 'E', 'R', 'E', 'G', 0x01 };
	static const char s5[] = { 0x08, '_', 'S', '5', '_', 0x12 };
	struct acpi_info acpi = { 0 };
	long ged_port, slp_typ;
	u64 sleep_port, s5_package;

	if (!walk_tables(&acpi))
		return 0;
	ged_port = aml_integer(dsdt_find(&acpi, ereg, sizeof(ereg)));
	/* After _S5_'s PackageOp come its PkgLength and NumElements (one byte each here). */
	s5_package = dsdt_find(&acpi, s5, sizeof(s5));
	slp_typ = aml_integer(s5_package ? s5_package + 2 : 0);
	sleep_port = rd64(acpi.fadt + FADT_SLEEP_CTL + 4);
	if (ged_port < 0 || slp_typ < 0 || rd8(acpi.fadt + FADT_SLEEP_CTL) != GAS_SYSTEM_IO) {
		printf("probe: acpi-power cannot find EREG, _S5_ or an I/O sleep register\n");
		return 0;
	}
	printf("probe: acpi-power waiting ged-port=0x%lx\n", ged_port);
	while (!(inb(ged_port) & 1))
		cpu_relax();
	printf("probe: acpi-power button slp-typ=%ld\n", slp_typ);
	outb(sleep_port, (slp_typ << 2) | SLP_EN);
	printf("probe: acpi-power still running after S5\n");
	return 0;
}
