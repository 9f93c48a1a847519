/* The probe's flattened device tree reader (Devicetree Specification 0.4, chapter 5). */
#include "fdt.h"

/* 5.2: the header, 32-bit big-endian words */
#define HDR_MAGIC		0x00
#define HDR_TOTALSIZE		0x04
#define HDR_OFF_DT_STRUCT	0x08
#define HDR_OFF_DT_STRINGS	0x0c
#define HDR_VERSION		0x14
#define HDR_LAST_COMP_VERSION	0x18
#define HDR_SIZE_DT_STRINGS	0x20
#define HDR_SIZE_DT_STRUCT	0x24

/* 5.4.1: structure block tokens */
#define FDT_BEGIN_NODE	1
#define FDT_END_NODE	2
#define FDT_PROP	3
#define FDT_NOP		4
#define FDT_END		9

#define MAX_DEPTH	16

u32 fdt_be32(const void *p)
{
	u32 v = *(const volatile u32 *)p;
	return __builtin_bswap32(v);
}

static u32 hdr(u64 fdt, u32 off) { return fdt_be32((const void *)(fdt + off)); }

u64 fdt_cells(const void *p, u32 cells)
{
	const u32 *w = p;
	return cells == 2 ? (u64)fdt_be32(w) << 32 | fdt_be32(w + 1) : fdt_be32(w);
}

int fdt_check(u64 fdt)
{
	u32 size;

	if (!fdt || fdt & 7 || hdr(fdt, HDR_MAGIC) != FDT_MAGIC)
		return -1;
	size = hdr(fdt, HDR_TOTALSIZE);
	if (hdr(fdt, HDR_VERSION) < 16 || hdr(fdt, HDR_LAST_COMP_VERSION) > 17 ||
	    hdr(fdt, HDR_OFF_DT_STRUCT) & 3 ||
	    (u64)hdr(fdt, HDR_OFF_DT_STRUCT) + hdr(fdt, HDR_SIZE_DT_STRUCT) > size ||
	    (u64)hdr(fdt, HDR_OFF_DT_STRINGS) + hdr(fdt, HDR_SIZE_DT_STRINGS) > size)
		return -1;
	return 0;
}

u32 fdt_totalsize(u64 fdt) { return hdr(fdt, HDR_TOTALSIZE); }
u32 fdt_version(u64 fdt) { return hdr(fdt, HDR_VERSION); }

static u64 struct_end(u64 fdt)
{
	return fdt + hdr(fdt, HDR_OFF_DT_STRUCT) + hdr(fdt, HDR_SIZE_DT_STRUCT);
}

static u64 align4(u64 a) { return (a + 3) & ~3UL; }

/* The token after a node's FDT_BEGIN_NODE and its NUL-terminated, padded name. */
static u64 node_body(u64 node)
{
	const char *name = (const char *)(node + 4);
	return align4(node + 4 + strlen(name) + 1);
}

const char *fdt_name(u64 node)
{
	return (const char *)(node + 4);
}

/* 5.4.1: properties come before a node's subnodes, so they end at the first other token. */
const void *fdt_prop(u64 fdt, u64 node, const char *name, u32 *len)
{
	u64 p = node_body(node), end = struct_end(fdt);
	const char *strings = (const char *)(fdt + hdr(fdt, HDR_OFF_DT_STRINGS));
	size_t n = strlen(name) + 1;

	while (p + 4 <= end) {
		u32 token = fdt_be32((const void *)p);
		if (token == FDT_NOP) {
			p += 4;
			continue;
		}
		if (token != FDT_PROP || p + 12 > end)
			return NULL;
		u32 plen = fdt_be32((const void *)(p + 4)), nameoff = fdt_be32((const void *)(p + 8));
		if (nameoff < hdr(fdt, HDR_SIZE_DT_STRINGS) && !strncmp(strings + nameoff, name, n)) {
			*len = plen;
			return (const void *)(p + 12);
		}
		p = align4(p + 12 + plen);
	}
	return NULL;
}

int fdt_prop_has(u64 fdt, u64 node, const char *name, const char *str)
{
	u32 len = 0;
	const char *v = fdt_prop(fdt, node, name, &len), *end = v + len;
	size_t n = strlen(str) + 1;

	for (; v && v < end; v += strlen(v) + 1)
		if ((size_t)(end - v) >= n && !strncmp(v, str, n))
			return 1;
	return 0;
}

u32 fdt_prop_u32(u64 fdt, u64 node, const char *name, u32 dflt)
{
	u32 len;
	const void *v = fdt_prop(fdt, node, name, &len);

	return v && len == 4 ? fdt_be32(v) : dflt;
}

int fdt_walk(u64 fdt, fdt_visitor visit)
{
	u64 stack[MAX_DEPTH], p = fdt + hdr(fdt, HDR_OFF_DT_STRUCT), end = struct_end(fdt);
	u32 depth = 0;

	while (p + 4 <= end) {
		u32 token = fdt_be32((const void *)p);
		switch (token) {
		case FDT_BEGIN_NODE:
			if (depth == MAX_DEPTH)
				return -1;
			visit(fdt, p, depth ? stack[depth - 1] : 0, depth);
			stack[depth++] = p;
			p = node_body(p);
			break;
		case FDT_END_NODE:
			if (!depth--)
				return -1;
			p += 4;
			break;
		case FDT_PROP:
			if (p + 12 > end)
				return -1;
			p = align4(p + 12 + fdt_be32((const void *)(p + 4)));
			break;
		case FDT_NOP:
			p += 4;
			break;
		case FDT_END:
			return depth ? -1 : 0;
		default:
			return -1;
		}
	}
	return -1;
}
