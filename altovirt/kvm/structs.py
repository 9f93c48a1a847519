"""ctypes mirrors of the KVM ABI structures (<linux/kvm.h>, <asm/kvm.h>).

Names and field order follow the kernel headers so that a reader can check
them side by side; ``tests/test_abi.py`` compiles the real headers and
compares every size and offset used here.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64
s32 = C.c_int32


def offsetof(struct: type[C.Structure], field: str) -> int:
    """offsetof(3) for a ctypes structure, as the kernel header lays it out."""
    return int(getattr(struct, field).offset)


class _Struct(C.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- registers (asm/kvm.h) ---------------------------------------------------

class kvm_regs(_Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
        ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(_Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
        ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
        ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32),
    ]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only; the entries follow it (flexible array)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs_n(n: int) -> type[C.Structure]:
    """A ``kvm_msrs`` with room for ``n`` entries."""
    return type(f"kvm_msrs_{n}", (_Struct,), {
        "_fields_": [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]})


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    """Header only; the entries follow it (flexible array)."""
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2_n(n: int) -> type[C.Structure]:
    """A ``kvm_cpuid2`` with room for ``n`` entries."""
    return type(f"kvm_cpuid2_{n}", (_Struct,), {
        "_fields_": [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]})


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", C.c_char * KVM_APIC_REG_SIZE)]


class kvm_xsave(_Struct):
    # The 4 KiB legacy form; KVM_GET_XSAVE2 may need more, sized by KVM_CAP_XSAVE2.
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class _ev_exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8),
                ("pending", u8), ("error_code", u32)]


class _ev_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _ev_exception), ("interrupt", _ev_interrupt), ("nmi", _ev_nmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _ev_smi),
        ("triple_fault_pending", u8), ("reserved", u8 * 26),
        ("exception_has_payload", u8), ("exception_payload", u64),
    ]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


# --- VM-wide structures (linux/kvm.h) ----------------------------------------

class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_reinject_control(_Struct):
    _fields_ = [("pit_reinject", u8), ("reserved", u8 * 31)]


class kvm_pit_channel_state(_Struct):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8),
        ("status_latched", u8), ("status", u8), ("read_state", u8),
        ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
        ("bcd", u8), ("gate", u8), ("count_load_time", C.c_int64),
    ]


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_irqchip(_Struct):
    # chip_id, pad, then a 512-byte union of pic/ioapic state kept opaque:
    # snapshots save and restore it as bytes.
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", C.c_char * 512)]


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class kvm_irq_routing_irqchip(_Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class kvm_irq_routing_entry_u(C.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(_Struct):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", kvm_irq_routing_entry_u)]


class kvm_irq_routing(_Struct):
    """The header; KVM_SET_GSI_ROUTING reads ``nr`` entries right after it."""
    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_dirty_log(_Struct):
    # The kernel's union of a bitmap pointer and padding: the address as a u64.
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clock_data(_Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


# --- generic and arm64 structures (linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h) ---

class kvm_one_reg(_Struct):
    # ``addr``: the user-space address the register's value is read from or written to.
    _fields_ = [("id", u64), ("addr", u64)]


class kvm_reg_list(_Struct):
    # Followed by ``n`` u64 register ids (a flexible array member).
    _fields_ = [("n", u64)]


class kvm_create_device(_Struct):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class kvm_device_attr(_Struct):
    # ``addr``: the user-space address of the attribute's value.
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_irq_level(_Struct):
    # The kernel's union of irq and status: the line number as a u32.
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_vcpu_init(_Struct):
    _fields_ = [("target", u32), ("features", u32 * 7)]


# --- the shared kvm_run page --------------------------------------------------

class kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(C.Union):
    _fields_ = [
        ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
        ("padding", C.c_char * 256),
    ]


class kvm_run(_Struct):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64), ("u", kvm_run_exit),
        # KVM_CAP_SYNC_REGS: registers shared without ioctls (unused for now, kept opaque).
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", C.c_char * 2048),
    ]
