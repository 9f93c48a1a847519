/*
 * A reader for flattened device trees (Devicetree Specification 0.4, chapter 5):
 * a blob handed over by the loader, read in place, big-endian, with aligned
 * 32-bit and byte loads only (the probe runs with the MMU off).
 */
#ifndef PROBE_FDT_H
#define PROBE_FDT_H
#include "lib.h"

#define FDT_MAGIC	0xd00dfeed

/* 0 when the header is sound (magic, version 17 compatible with 16, sizes); else -1. */
int fdt_check(u64 fdt);
u32 fdt_totalsize(u64 fdt);
u32 fdt_version(u64 fdt);

/*
 * Visit every node depth first, parents before children: node and parent are
 * the addresses of their FDT_BEGIN_NODE tokens (parent 0 for the root).
 * Returns 0, or -1 when the structure block is malformed.
 */
typedef void (*fdt_visitor)(u64 fdt, u64 node, u64 parent, u32 depth);
int fdt_walk(u64 fdt, fdt_visitor visit);

const char *fdt_name(u64 node);		/* "memory@40000000"; "" for the root */
/* A property's value and length, or NULL when the node has no such property. */
const void *fdt_prop(u64 fdt, u64 node, const char *name, u32 *len);
/* Is str one of the NUL-separated strings of the property (a "compatible" list)? */
int fdt_prop_has(u64 fdt, u64 node, const char *name, const char *str);
/* A u32 property ("#address-cells"), or dflt when absent or malformed. */
u32 fdt_prop_u32(u64 fdt, u64 node, const char *name, u32 dflt);
u32 fdt_be32(const void *p);				/* p 4-byte aligned */
u64 fdt_cells(const void *p, u32 cells);		/* 1 or 2 cells at p */

#endif
