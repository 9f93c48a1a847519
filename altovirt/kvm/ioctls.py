"""KVM ioctl request numbers, exit reasons and capabilities (<linux/kvm.h>).

Request numbers are computed from the structure sizes exactly as the kernel's
``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros do (<asm-generic/ioctl.h>), so a
wrong structure size shows up as a wrong number in ``tests/test_abi.py``.
"""

from __future__ import annotations

import ctypes as C

from . import structs as S

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, S.kvm_cpuid2)

# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, S.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_GET_IRQCHIP = _iowr(0x62, S.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, S.kvm_irqchip)
KVM_REINJECT_CONTROL = _io(0x71)      # takes a struct kvm_reinject_control all the same
KVM_SET_GSI_ROUTING = _iow(0x6A, S.kvm_irq_routing)
KVM_IRQFD = _iow(0x76, S.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, S.kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, S.kvm_ioeventfd)
KVM_SET_CLOCK = _iow(0x7B, S.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, S.kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, S.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, S.kvm_pit_state2)
KVM_IRQ_LINE = _iow(0x61, S.kvm_irq_level)
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, S.kvm_vcpu_init)
KVM_CREATE_DEVICE = _iowr(0xE0, S.kvm_create_device)
KVM_SET_DEVICE_ATTR = _iow(0xE1, S.kvm_device_attr)    # also on a device fd
KVM_GET_DEVICE_ATTR = _iow(0xE2, S.kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _iow(0xE3, S.kvm_device_attr)

# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, S.kvm_regs)
KVM_SET_REGS = _iow(0x82, S.kvm_regs)
KVM_GET_SREGS = _ior(0x83, S.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, S.kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, S.kvm_msrs)
KVM_SET_MSRS = _iow(0x89, S.kvm_msrs)
KVM_GET_FPU = _ior(0x8C, S.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, S.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, S.kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, S.kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, S.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, S.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, S.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, S.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, S.kvm_debugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, S.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, S.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, S.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, S.kvm_xcrs)
KVM_GET_ONE_REG = _iow(0xAB, S.kvm_one_reg)
KVM_SET_ONE_REG = _iow(0xAC, S.kvm_one_reg)
KVM_ARM_VCPU_INIT = _iow(0xAE, S.kvm_vcpu_init)
KVM_GET_REG_LIST = _iowr(0xB0, S.kvm_reg_list)

KVM_API_VERSION = 12

# Exit reasons (kvm_run.exit_reason).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_ARM_NISV = 28

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_CLOCK_TSC_STABLE = 2

# Capabilities (KVM_CHECK_EXTENSION), the ones AltoVirt relies on.
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_MSI_DEVID = 131
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_ONE_REG = 70
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_IMMEDIATE_EXIT = 136
