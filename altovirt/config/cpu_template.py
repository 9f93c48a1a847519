"""CPU templates as Firecracker defines them (``docs/cpu_templates/cpu-templates.md``): what
the vCPUs show the guest, as bit filters over what KVM offers, so that a fleet of differing
hosts shows one CPU and a snapshot can move between them.

A *custom* template is Firecracker's JSON object (``PUT /cpu-config``, ``cpu-config`` in a
configuration file): on x86_64 ``kvm_capabilities``, ``cpuid_modifiers`` and
``msr_modifiers``; on arm64 ``kvm_capabilities``, ``vcpu_features`` and ``reg_modifiers``. A
*static* template is one of Firecracker's by name (``cpu_template`` in the machine
configuration); the architecture (:mod:`altovirt.arch`) turns it into the modifiers it
stands for, at the start, where it also checks that it suits the host's CPU.

Bitmaps are strings of ``0``, ``1`` and ``x`` (leave alone) from the most significant bit,
``_`` separating groups; a short one leaves its missing high bits alone. The parse errors
are serde's and Firecracker's words, which clients show.
"""

from __future__ import annotations

from typing import Any

from .keys import Problem, find_key_problem
from .model import (
    MACHINE,
    VCPU_INIT_WORDS,
    BitFilter,
    ConfigError,
    CpuidModifier,
    CpuTemplate,
    RegisterModifier,
    VcpuFeatures,
)

# Firecracker's static templates, by architecture (StaticCpuTemplate); "None" is no template.
STATIC_TEMPLATES = {"x86_64": ("C3", "T2", "T2S", "None", "T2CL", "T2A"), "aarch64": ("V1N1", "None")}
# The custom template's fields (CustomCpuTemplate, deny_unknown_fields), by architecture.
TEMPLATE_FIELDS = {"x86_64": ("kvm_capabilities", "cpuid_modifiers", "msr_modifiers"),
                   "aarch64": ("kvm_capabilities", "vcpu_features", "reg_modifiers")}
CPUID_REGISTERS = ("eax", "ebx", "ecx", "edx")


def parse_bitmap(text: object, bits: int) -> BitFilter:
    """A bitmap string (templates.rs, RegisterValueFilter) of at most ``bits`` bits."""
    s = _string(text)
    filter_ = value = i = 0
    for c in reversed(s.removeprefix("0b")):
        if c == "_":
            continue
        if i == bits:
            raise ConfigError(f"Failed to parse string [{s}] as a bitmap - string is too long")
        if c in "01":
            filter_ |= 1 << i
            value |= int(c) << i
        elif c != "x":
            raise ConfigError(f"Failed to parse string [{s}] as a bitmap - unknown character: "
                              f"{c.encode()[0]}")
        i += 1
    return BitFilter(filter_, value)


def parse_number(text: object, bits: int) -> int:
    """A leaf, subleaf or address: "0x..." or "0b..." (templates_serde.rs)."""
    s = _string(text)
    for prefix, base in (("0b", 2), ("0x", 16)):
        if s.startswith(prefix):
            digits = s[2:]
            kind = "Empty" if not digits else None
            if kind is None:
                try:
                    n = int(digits, base)
                except ValueError:
                    kind = "InvalidDigit"
                else:
                    kind = "PosOverflow" if n >> bits else None
            if kind is not None:
                raise ConfigError(f"Failed to parse string [{s}] as a number for CPU template - "
                                  f"ParseIntError {{ kind: {kind} }}")
            return n
    raise ConfigError(f"No supported number system prefix found in value [{s}]. Make sure to prefix the "
                      "number with '0x' for hexadecimal numbers or '0b' for binary numbers.")


def parse(doc: object, machine: str = MACHINE) -> CpuTemplate:
    """Firecracker's custom template for ``machine``; ConfigError with serde's message."""
    top = _object(doc, TEMPLATE_FIELDS[machine], ())
    caps = tuple(_capability(c) for c in _array(top.get("kvm_capabilities", [])))
    if machine == "x86_64":
        return CpuTemplate(caps, tuple(_cpuid_modifier(m) for m in _array(top.get("cpuid_modifiers", []))),
                           tuple(_register_modifier(m, 32, 64) for m in _array(top.get("msr_modifiers", []))))
    features = tuple(VcpuFeatures(_u32(f["index"]), parse_bitmap(f["bitmap"], 32)) for f in
                     (_object(f, (), ("index", "bitmap")) for f in _array(top.get("vcpu_features", []))))
    for f in features:
        if f.index >= VCPU_INIT_WORDS:
            raise ConfigError(f"vcpu_features index {f.index}: KVM_ARM_VCPU_INIT has {VCPU_INIT_WORDS} words "
                              f"of features, 0 to {VCPU_INIT_WORDS - 1}")
    regs = tuple(_register_modifier(m, 64, 128) for m in _array(top.get("reg_modifiers", [])))
    for r in regs:
        size = 1 << (r.addr >> 52 & 0xF)       # KVM_REG_SIZE (asm/kvm.h): log2 of the bytes
        if size not in (4, 8, 16):
            raise ConfigError(f"Invalid aarch64 register address: {r.addr:#x} - Only 32, 64 and 128 bit "
                              "wide registers are supported")
        if max(r.bitmap.filter, r.bitmap.value) >> size * 8:
            raise ConfigError(f"Invalid size of bitmap for register {r.addr:#x}, should be <= "
                              f"{size * 8} bits")
    return CpuTemplate(caps, vcpu_features=features, reg_modifiers=regs)


def export(t: CpuTemplate, machine: str = MACHINE) -> dict[str, Any]:
    """``t`` in Firecracker's JSON form (:func:`parse` reads it back)."""
    caps = [str(c) if c >= 0 else f"!{~c}" for c in t.kvm_capabilities]
    if machine == "x86_64":
        return {"kvm_capabilities": caps,
                "cpuid_modifiers": [{"leaf": hex(m.leaf), "subleaf": hex(m.subleaf), "flags": m.flags,
                                     "modifiers": [{"register": r, "bitmap": f.bitmap(32)}
                                                   for r, f in m.registers]}
                                    for m in t.cpuid_modifiers],
                "msr_modifiers": [{"addr": hex(m.addr), "bitmap": m.bitmap.bitmap(64)}
                                  for m in t.msr_modifiers]}
    return {"kvm_capabilities": caps,
            "vcpu_features": [{"index": f.index, "bitmap": f.bitmap.bitmap(32)} for f in t.vcpu_features],
            "reg_modifiers": [{"addr": hex(m.addr), "bitmap": m.bitmap.bitmap(128)} for m in t.reg_modifiers]}


def parse_static(name: object, machine: str = MACHINE) -> str | None:
    """``cpu_template`` of the machine configuration: a static template's name, None for "None"."""
    names = STATIC_TEMPLATES[machine]
    if not isinstance(name, str) or name not in names:
        expected = ", ".join(f"`{n}`" for n in names)
        raise ConfigError(f"unknown variant `{name}`, expected one of {expected}")
    return None if name == "None" else name


def _cpuid_modifier(doc: object) -> CpuidModifier:
    m = _object(doc, (), ("leaf", "subleaf", "flags", "modifiers"))
    registers = []
    for r in _array(m["modifiers"]):
        r = _object(r, (), ("register", "bitmap"))
        if r["register"] not in CPUID_REGISTERS:
            raise ConfigError("Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]")
        registers.append((r["register"], parse_bitmap(r["bitmap"], 32)))
    return CpuidModifier(parse_number(m["leaf"], 32), parse_number(m["subleaf"], 32), _u32(m["flags"]),
                         tuple(registers))


def _register_modifier(doc: object, addr_bits: int, bits: int) -> RegisterModifier:
    m = _object(doc, (), ("addr", "bitmap"))
    return RegisterModifier(parse_number(m["addr"], addr_bits), parse_bitmap(m["bitmap"], bits))


def _capability(text: object) -> int:
    s = _string(text)
    digits = s.removeprefix("!")
    problem = ("cannot parse integer from empty string" if not digits else
               "invalid digit found in string" if not digits.isascii() or not digits.isdigit() else
               "number too large to fit in target type" if int(digits) >> 32 else None)
    if problem is not None:
        raise ConfigError(f"Failed to parse string [{s}] as a kvm capability - can not convert to "
                          f"numeric: {problem}")
    return ~int(digits) if s.startswith("!") else int(digits)


def _object(doc: object, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """``doc`` as a struct: ``allowed`` its only fields (empty: any field), ``required`` there."""
    if not isinstance(doc, dict):
        raise ConfigError(f"invalid type: {_kind(doc)}, expected a map")
    known = dict.fromkeys(allowed or doc, object)
    problem = find_key_problem(doc, dict.fromkeys(required, object), known)
    if problem is not None and problem.kind is Problem.UNKNOWN:
        raise ConfigError(f"unknown field `{problem.key}`, expected one of "
                          + ", ".join(f"`{a}`" for a in allowed))
    if problem is not None:
        raise ConfigError(f"missing field `{problem.key}`")
    return doc


def _array(doc: object) -> list[Any]:
    if not isinstance(doc, list):
        raise ConfigError(f"invalid type: {_kind(doc)}, expected a sequence")
    return doc


def _string(doc: object) -> str:
    if not isinstance(doc, str):
        raise ConfigError(f"invalid type: {_kind(doc)}, expected a string")
    return doc


def _u32(doc: object) -> int:
    if isinstance(doc, bool) or not isinstance(doc, int):
        raise ConfigError(f"invalid type: {_kind(doc)}, expected u32")
    if not 0 <= doc < 1 << 32:
        raise ConfigError(f"invalid value: integer `{doc}`, expected u32")
    return doc


def _kind(doc: object) -> str:
    """What serde calls a JSON value it did not expect."""
    if doc is None:
        return "null"
    if isinstance(doc, bool):
        return f"boolean `{str(doc).lower()}`"
    if isinstance(doc, int):
        return f"integer `{doc}`"
    if isinstance(doc, float):
        return f"floating point `{doc}`"
    if isinstance(doc, str):
        return f"string {doc!r}".replace("'", '"')
    return "sequence" if isinstance(doc, list) else "map"
