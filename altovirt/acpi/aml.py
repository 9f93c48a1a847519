"""A small ACPI Machine Language encoder: just the terms a VMM's DSDT needs.

Each function returns the encoded bytes of one term (ACPI 6.4, chapter 20,
"ACPI Machine Language Specification"), so a table body is built by nesting
calls, much as it is written in ASL::

    scope("\\_SB_", device("COM1", name("_HID", eisa_id("PNP0501")), ...))

Names are checked here (four characters from A-Z, 0-9 and _, not starting
with a digit, 20.2.2), so a typo fails at build time, not in the guest.
"""

from __future__ import annotations

import re
import struct

from ..errors import AltoVirtError

# Opcodes (20.3).
ONES_OP = 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
LOCAL0_OP, ARG0_OP = 0x60, 0x68
STORE_OP, AND_OP, OR_OP, NOTIFY_OP = 0x70, 0x7B, 0x7D, 0x86
CREATE_DWORD_FIELD_OP, LNOT_OP, LEQUAL_OP, IF_OP, ELSE_OP, RETURN_OP = 0x8A, 0x92, 0x93, 0xA0, 0xA1, 0xA4
EXT_OP_PREFIX = 0x5B
EXT_OP_REGION, EXT_FIELD, EXT_DEVICE = 0x80, 0x81, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F

# OperationRegion space (19.6.100) and field flags (20.2.5.2) we use.
SYSTEM_IO = 0x01
ACCESS_BYTE = 1
UPDATE_PRESERVE = 0

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


class AmlError(AltoVirtError, ValueError):
    """A term that cannot be encoded (bad name, out-of-range value)."""


def pkg_length(body_len: int) -> bytes:
    """The PkgLength of a body of ``body_len`` bytes; it counts its own bytes (20.2.4)."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {body_len} bytes is longer than AML allows")


def _package(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    if not _NAME_SEG.fullmatch(seg):
        raise AmlError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """``\\_SB_.COM1``, ``_HID`` or ``^PARENT`` style paths (20.2.2)."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    while path.startswith("^"):
        prefix, path = prefix + b"^", path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\0"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of ``value`` (20.2.3, ComputationalData)."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"integer {value} is outside 0..2^64-1")
    if value in (0, 1):
        return bytes([value])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if 0 in raw:
        raise AmlError("AML strings cannot hold NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> bytes:
    """A compressed EISA id such as ``PNP0C0C`` (ASL's EISAID(), 19.6.35) as an integer."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"bad EISA id {text!r}")
    vendor = sum((ord(c) - 0x40) << shift for c, shift in zip(text[:3], (10, 5, 0), strict=True))
    product = int(text[3:], 16)
    return integer(int.from_bytes(struct.pack(">HH", vendor, product), "little"))


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    return _package(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _package(bytes([EXT_OP_PREFIX, EXT_DEVICE]), name_string(path) + b"".join(terms))


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise AmlError("a method takes 0 to 7 arguments")
    flags = args | (0x08 if serialized else 0)
    return _package(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def package(*elements: bytes) -> bytes:
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    return _package(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


def buffer(data: bytes) -> bytes:
    return _package(bytes([BUFFER_OP]), integer(len(data)) + data)


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    return (bytes([EXT_OP_PREFIX, EXT_OP_REGION]) + name_string(path) + bytes([space])
            + integer(offset) + integer(length))


def field(region: str, access: int, update: int, *units: tuple[str, int]) -> bytes:
    """Field(region, access, NoLock, update) { name, bits, ... } (19.6.48)."""
    body = name_string(region) + bytes([access | (update << 5)])
    for unit, bits in units:
        body += name_seg(unit) + _field_length(bits)
    return _package(bytes([EXT_OP_PREFIX, EXT_FIELD]), body)


def _field_length(bits: int) -> bytes:
    # A NamedField's length is a PkgLength-style number that does not count itself.
    if bits < 0x40:
        return bytes([bits])
    for extra in range(1, 4):
        if bits < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (bits & 0x0F)]) + (bits >> 4).to_bytes(extra, "little")
    raise AmlError(f"field of {bits} bits is too long")


def local(n: int) -> bytes:
    return bytes([LOCAL0_OP + n])


def arg(n: int) -> bytes:
    return bytes([ARG0_OP + n])


def store(source: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + source + target


def and_(a: bytes, b: bytes, target: bytes = b"\0") -> bytes:
    """And(a, b[, target]); the null name as target discards the result."""
    return bytes([AND_OP]) + a + b + target


def or_(a: bytes, b: bytes, target: bytes = b"\0") -> bytes:
    return bytes([OR_OP]) + a + b + target


def lequal(a: bytes, b: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + a + b


def lnot(a: bytes) -> bytes:
    return bytes([LNOT_OP]) + a


def create_dword_field(source: bytes, byte_index: int, name: str) -> bytes:
    """CreateDWordField (source, byte_index, name) (19.6.19)."""
    return bytes([CREATE_DWORD_FIELD_OP]) + source + integer(byte_index) + name_seg(name)


def else_(*terms: bytes) -> bytes:
    return _package(bytes([ELSE_OP]), b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def uuid(text: str) -> bytes:
    """ToUUID ("...") (19.6.142): a 16-byte Buffer in the GUID's mixed-endian layout."""
    import uuid as _uuid
    return buffer(_uuid.UUID(text).bytes_le)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return _package(bytes([IF_OP]), predicate + b"".join(terms))


def notify(path: str, value: int) -> bytes:
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# --- resource descriptors, the body of a ResourceTemplate (6.4) ---

END_TAG = 0x79
IO_PORT_TAG = 0x47              # 6.4.2.5
IRQ_NO_FLAGS_TAG = 0x22         # 6.4.2.1, two-byte form
MEMORY32_FIXED_TAG = 0x86       # 6.4.3.4
EXTENDED_IRQ_TAG = 0x89         # 6.4.3.6
DWORD_ADDRESS_TAG, WORD_ADDRESS_TAG, QWORD_ADDRESS_TAG = 0x87, 0x88, 0x8A    # 6.4.3.5.1-3
# Address space descriptors: resource types and flags (6.4.3.5, table 6.50 and 6.51)
MEMORY_RANGE, IO_RANGE, BUS_NUMBER_RANGE = 0, 1, 2
PRODUCER_FIXED = 0x0C           # a bridge's window: producer, positive decode, min and max fixed
IO_ENTIRE_RANGE = 0x03          # ISA and non-ISA ports
MEMORY_READ_WRITE, MEMORY_CACHEABLE, MEMORY_PREFETCHABLE = 0x01, 0x02, 0x06


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length)."""
    return struct.pack("<BBHHBB", IO_PORT_TAG, 1, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags () {irq}: an ISA interrupt, edge-triggered, active high."""
    if not 0 <= irq < 16:
        raise AmlError(f"ISA IRQ {irq} is outside 0..15")
    return struct.pack("<BH", IRQ_NO_FLAGS_TAG, 1 << irq)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, int(writable), base, length)


def interrupt(gsi: int, *, edge: bool = True, active_low: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive) {gsi}."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    return struct.pack("<BHBBI", EXTENDED_IRQ_TAG, 6, flags, 1, gsi)


def _address_space(tag: int, fmt: str, kind: int, type_flags: int, base: int, length: int) -> bytes:
    """A bridge's window of ``length`` at ``base`` (granularity 0, no translation)."""
    end = base + length - 1
    if length <= 0 or end >= 1 << (8 * struct.calcsize(fmt)):
        raise AmlError(f"window {base:#x}+{length:#x} does not fit the descriptor")
    body = struct.pack(f"<BBB5{fmt}", kind, PRODUCER_FIXED, type_flags, 0, base, end, 0, length)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(first: int, last: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, n)."""
    return _address_space(WORD_ADDRESS_TAG, "H", BUS_NUMBER_RANGE, 0, first, last - first + 1)


def word_io(base: int, length: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address_space(WORD_ADDRESS_TAG, "H", IO_RANGE, IO_ENTIRE_RANGE, base, length)


def dword_memory(base: int, length: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address_space(DWORD_ADDRESS_TAG, "I", MEMORY_RANGE, MEMORY_READ_WRITE, base, length)


def qword_memory(base: int, length: int) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite, ...)."""
    return _address_space(QWORD_ADDRESS_TAG, "Q", MEMORY_RANGE, MEMORY_PREFETCHABLE | MEMORY_READ_WRITE,
                          base, length)


def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer of the descriptors and an end tag (checksum 0: "treat as valid")."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def crs(*descriptors: bytes) -> bytes:
    """Name (_CRS, ResourceTemplate () {descriptors}): a device's current resources (6.2.2)."""
    return name("_CRS", resource_template(*descriptors))
