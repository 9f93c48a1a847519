"""File-descriptor wrappers for /dev/kvm, a VM and a vCPU.

Every ioctl goes through ctypes ``libc.ioctl`` with ``use_errno``: it releases
the GIL while the kernel works (KVM_RUN can block for seconds), passes 64-bit
arguments unchanged and returns EINTR to us instead of retrying, which is how
a signal kicks a vCPU out of KVM_RUN.
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
from collections.abc import Iterable, Sequence

from ..errors import AltoVirtError
from . import ioctls as K
from . import structs as S

_libc = C.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = C.c_int
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]

_IOCTL_NAMES = {v: k for k, v in vars(K).items() if k.startswith("KVM_") and not k.startswith(
    ("KVM_CAP_", "KVM_EXIT_", "KVM_MP_", "KVM_SYSTEM_", "KVM_IOEVENTFD_", "KVM_IRQFD_",
     "KVM_PIT_", "KVM_CLOCK_", "KVM_MEM_"))}


class KvmError(AltoVirtError, OSError):
    """An ioctl failed; ``str()`` names the ioctl and the errno."""


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """Issue ``request`` on ``fd``; ``arg`` is an int, a ctypes object or None."""
    if arg is None:
        ptr: int | None = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = C.addressof(arg)  # type: ignore[arg-type]
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        _failed(request)
    return ret


def _failed(request: int) -> None:
    """Raise the KvmError of ``request``, which has just failed."""
    err = C.get_errno()
    name = _IOCTL_NAMES.get(request, hex(request))
    raise KvmError(err, f"{name}: {os.strerror(err)}")


def _get_cpuid(fd: int, request: int) -> list[S.kvm_cpuid_entry2]:
    """A CPUID table (KVM_GET_SUPPORTED_CPUID, KVM_GET_CPUID2), asked for with more room
    while KVM answers E2BIG."""
    n = 64
    while True:
        buf = S.kvm_cpuid2_n(n)()
        buf.nent = n
        try:
            ioctl(fd, request, buf)
        except KvmError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return [buf.entries[i] for i in range(buf.nent)]


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = ioctl(self.fd, K.KVM_GET_API_VERSION)
            if version != K.KVM_API_VERSION:
                raise KvmError(errno.ENOTSUP,
                               f"KVM API version {version}, AltoVirt needs {K.KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE)
            self._supported_cpuid: list[S.kvm_cpuid_entry2] | None = None
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap)

    def missing_caps(self, names: Iterable[str]) -> list[str]:
        """Those of the capabilities ``names`` (``KVM_CAP_*``) this host lacks."""
        return [name for name in names if self.check_extension(getattr(K, name)) <= 0]

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        """What KVM can give a guest (read once: it does not change); callers copy entries."""
        if self._supported_cpuid is None:
            self._supported_cpuid = _get_cpuid(self.fd, K.KVM_GET_SUPPORTED_CPUID)
        return self._supported_cpuid

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        head = S.kvm_msr_list(nmsrs=0)
        try:
            ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, head)      # E2BIG, with the count filled in
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        buf = (C.c_uint32 * (1 + head.nmsrs))(head.nmsrs)
        ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf[1:1 + buf[0]])

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, K.KVM_CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A VM fd: memory slots, the in-kernel IRQ chip, PIT and other devices, eventfds."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.devices: list[Device] = []

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = S.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: C.Array[C.c_uint64]) -> None:
        """Fill ``bitmap`` (a bit per 4 KiB page of memory slot ``slot``) with the pages the
        guest wrote since the last call, and clear KVM's (the slot logs dirty pages)."""
        ioctl(self.fd, K.KVM_GET_DIRTY_LOG, S.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(bitmap)))

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, K.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = K.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, K.KVM_CREATE_PIT2, S.kvm_pit_config(flags=flags))

    def set_pit_reinject(self, reinject: bool) -> None:
        """Whether PIT ticks the guest missed are delivered late (KVM's default) or dropped
        (QEMU's ``lost_tick_policy=discard``). Turning reinjection off waits for two SRCU grace
        periods (some 15 ms on these hosts), as destroying a VM whose PIT reinjects does."""
        ioctl(self.fd, K.KVM_REINJECT_CONTROL, S.kvm_reinject_control(pit_reinject=int(reinject)))

    def check_extension(self, cap: int) -> int:
        """A capability as this VM has it (some are the VM's own, as arm64's)."""
        return ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None) -> None:
        """Have a write to ``fd`` raise ``gsi``: an edge, or with ``resample_fd`` a level that
        KVM lowers at the guest's EOI, signalling ``resample_fd`` for the VMM to raise it
        again if its device still wants to (a level-triggered INTx)."""
        flags = K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= K.KVM_IRQFD_FLAG_RESAMPLE
        ioctl(self.fd, K.KVM_IRQFD, S.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0))

    def set_gsi_routing(self, entries: list[S.kvm_irq_routing_entry]) -> None:
        """Replace the whole GSI routing table with ``entries`` (KVM_SET_GSI_ROUTING)."""
        head = C.sizeof(S.kvm_irq_routing)
        table = (C.c_uint8 * (head + len(entries) * C.sizeof(S.kvm_irq_routing_entry)))()
        S.kvm_irq_routing.from_buffer(table).nr = len(entries)
        array = (S.kvm_irq_routing_entry * len(entries)).from_buffer(table, head)
        array[:] = entries
        ioctl(self.fd, K.KVM_SET_GSI_ROUTING, table)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Have KVM signal ``fd`` on a guest write at ``addr`` (``length`` bytes, 0 for any
        length, MMIO only; with ``datamatch``, only of that value) instead of exiting."""
        flags = K.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if deassign:
            flags |= K.KVM_IOEVENTFD_FLAG_DEASSIGN
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, K.KVM_IOEVENTFD, S.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags))

    def get_clock(self) -> S.kvm_clock_data:
        data = S.kvm_clock_data()
        ioctl(self.fd, K.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: S.kvm_clock_data) -> None:
        ioctl(self.fd, K.KVM_SET_CLOCK, data)

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        chip = S.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, K.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        ioctl(self.fd, K.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> S.kvm_pit_state2:
        pit = S.kvm_pit_state2()
        ioctl(self.fd, K.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: S.kvm_pit_state2) -> None:
        ioctl(self.fd, K.KVM_SET_PIT2, pit)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive interrupt line ``irq`` (encoded as the architecture's KVM_IRQ_LINE wants it)
        to ``level``."""
        ioctl(self.fd, K.KVM_IRQ_LINE, S.kvm_irq_level(irq=irq, level=level))

    def create_device(self, kind: int) -> Device:
        """An in-kernel device of type ``kind`` (``KVM_DEV_TYPE_*``), listed in
        :attr:`devices` and closed with the VM."""
        dev = S.kvm_create_device(type=kind)
        ioctl(self.fd, K.KVM_CREATE_DEVICE, dev)
        device = Device(kind, dev.fd)
        self.devices.append(device)
        return device

    def arm_preferred_target(self) -> S.kvm_vcpu_init:
        """arm64: the vCPU target (and features) that suits this host's CPUs best."""
        init = S.kvm_vcpu_init()
        ioctl(self.fd, K.KVM_ARM_PREFERRED_TARGET, init)
        return init

    def create_vcpu(self, index: int) -> Vcpu:
        return Vcpu(self, index, ioctl(self.fd, K.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        for device in self.devices:
            device.close()
        self.devices.clear()
        os.close(self.fd)


class Device:
    """An in-kernel device of type ``kind`` (KVM_CREATE_DEVICE): its fd, and its attributes as
    64-bit values (an attribute of 32 bits is the low half: KVM reads and writes the first four
    bytes, and the hosts KVM runs on are little-endian)."""

    def __init__(self, kind: int, fd: int) -> None:
        self.kind = kind
        self.fd = fd

    def _attr(self, request: int, group: int, attr: int, value: C.c_uint64 | None) -> None:
        addr = 0 if value is None else C.addressof(value)
        ioctl(self.fd, request, S.kvm_device_attr(group=group, attr=attr, addr=addr))

    def set_attr(self, group: int, attr: int, value: int | None = None) -> None:
        """Set attribute ``attr`` of ``group`` to ``value`` (None: an attribute with no value,
        a command such as the vGIC's CTRL_INIT)."""
        self._attr(K.KVM_SET_DEVICE_ATTR, group, attr, None if value is None else C.c_uint64(value))

    def get_attr(self, group: int, attr: int) -> int:
        value = C.c_uint64()
        self._attr(K.KVM_GET_DEVICE_ATTR, group, attr, value)
        return value.value

    # A snapshot reads and a restore writes hundreds of a GIC's attributes while the guest
    # waits: these go through one argument and one value, with no Python call per attribute.

    def get_attrs(self, group: int, attrs: Iterable[int]) -> list[int]:
        """Attributes ``attrs`` of ``group``, in order."""
        value = C.c_uint64()
        arg = S.kvm_device_attr(group=group, addr=C.addressof(value))
        ptr, out = C.addressof(arg), []
        for attr in attrs:
            arg.attr = attr
            if _ioctl(self.fd, K.KVM_GET_DEVICE_ATTR, ptr) < 0:
                _failed(K.KVM_GET_DEVICE_ATTR)
            out.append(value.value)
        return out

    def set_attrs(self, group: int, values: Iterable[tuple[int, int]]) -> None:
        """Set attributes of ``group`` to values, by (attribute, value) pairs in order."""
        value = C.c_uint64()
        arg = S.kvm_device_attr(group=group, addr=C.addressof(value))
        ptr = C.addressof(arg)
        for arg.attr, value.value in values:
            if _ioctl(self.fd, K.KVM_SET_DEVICE_ATTR, ptr) < 0:
                _failed(K.KVM_SET_DEVICE_ATTR)

    def close(self) -> None:
        os.close(self.fd)


class Vcpu:
    """A vCPU fd and its mapped ``kvm_run`` page."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = S.kvm_run.from_buffer(self.run_map)
        self.arm_features: list[int] = []     # arm64: KVM_ARM_VCPU_INIT's, the same at every re-init

    def _get(self, request: int, t: type) -> object:
        obj = t()
        ioctl(self.fd, request, obj)
        return obj

    def run_once(self) -> int:
        """One KVM_RUN; returns 0 or -errno (EINTR/EAGAIN) without raising for those."""
        ret = _ioctl(self.fd, K.KVM_RUN, None)
        if ret < 0:
            err = C.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return -err
            raise KvmError(err, f"KVM_RUN: {os.strerror(err)}")
        return 0

    def enter_once(self) -> None:
        """One KVM_RUN with immediate_exit set, which returns at once and runs nothing
        (api.rst, kvm_run.immediate_exit)."""
        self.run.immediate_exit = 1
        try:
            self.run_once()
        finally:
            self.run.immediate_exit = 0

    def get_regs(self) -> S.kvm_regs:
        return self._get(K.KVM_GET_REGS, S.kvm_regs)  # type: ignore[return-value]

    def set_regs(self, regs: S.kvm_regs) -> None:
        ioctl(self.fd, K.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        return self._get(K.KVM_GET_SREGS, S.kvm_sregs)  # type: ignore[return-value]

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        ioctl(self.fd, K.KVM_SET_SREGS, sregs)

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        ioctl(self.fd, K.KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        buf = S.kvm_cpuid2_n(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, K.KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: dict[int, int]) -> None:
        buf = S.kvm_msrs_n(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i] = S.kvm_msr_entry(index=index, data=value)
        done = ioctl(self.fd, K.KVM_SET_MSRS, buf)
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {bad:#x} refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = S.kvm_msrs_n(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = ioctl(self.fd, K.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def get_cpuid2(self) -> list[S.kvm_cpuid_entry2]:
        return _get_cpuid(self.fd, K.KVM_GET_CPUID2)

    def get_debugregs(self) -> S.kvm_debugregs:
        return self._get(K.KVM_GET_DEBUGREGS, S.kvm_debugregs)  # type: ignore[return-value]

    def set_debugregs(self, regs: S.kvm_debugregs) -> None:
        ioctl(self.fd, K.KVM_SET_DEBUGREGS, regs)

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, K.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, K.KVM_SET_TSC_KHZ, khz)

    def get_lapic(self) -> S.kvm_lapic_state:
        return self._get(K.KVM_GET_LAPIC, S.kvm_lapic_state)  # type: ignore[return-value]

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        ioctl(self.fd, K.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        return self._get(K.KVM_GET_MP_STATE, S.kvm_mp_state).mp_state  # type: ignore[attr-defined]

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, K.KVM_SET_MP_STATE, S.kvm_mp_state(state))

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return self._get(K.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events)  # type: ignore[return-value]

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, events)

    def get_xsave(self) -> S.kvm_xsave:
        return self._get(K.KVM_GET_XSAVE, S.kvm_xsave)  # type: ignore[return-value]

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        ioctl(self.fd, K.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> S.kvm_xcrs:
        return self._get(K.KVM_GET_XCRS, S.kvm_xcrs)  # type: ignore[return-value]

    def set_xcrs(self, xcrs: S.kvm_xcrs) -> None:
        ioctl(self.fd, K.KVM_SET_XCRS, xcrs)

    def arm_vcpu_init(self, init: S.kvm_vcpu_init) -> None:
        """arm64: (re)initialise this vCPU as ``init`` says; its registers go to their reset
        values (arm64 has no other reset)."""
        ioctl(self.fd, K.KVM_ARM_VCPU_INIT, init)

    def get_one_reg(self, reg_id: int) -> int:
        """A register of 64 bits or fewer, by its ``KVM_REG_*`` id."""
        value = C.c_uint64()
        ioctl(self.fd, K.KVM_GET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=C.addressof(value)))
        return value.value

    def set_one_reg(self, reg_id: int, value: int) -> None:
        box = C.c_uint64(value)
        ioctl(self.fd, K.KVM_SET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=C.addressof(box)))

    def get_one_reg_bytes(self, reg_id: int, size: int) -> bytes:
        """A register of any size (``size`` bytes, as its id encodes)."""
        buf = (C.c_uint8 * size)()
        ioctl(self.fd, K.KVM_GET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=C.addressof(buf)))
        return bytes(buf)

    def set_one_reg_bytes(self, reg_id: int, value: bytes) -> None:
        buf = (C.c_uint8 * len(value)).from_buffer_copy(value)
        ioctl(self.fd, K.KVM_SET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=C.addressof(buf)))

    # A snapshot reads and a restore writes every register of every vCPU while the guest
    # waits (hundreds on arm64): these go through one buffer, with no Python call per register.

    def get_one_regs(self, regs: Sequence[tuple[int, int]]) -> list[bytes]:
        """Registers by (id, size in bytes), in order."""
        buf = C.create_string_buffer(max((size for _, size in regs), default=0))
        one = S.kvm_one_reg(addr=C.addressof(buf))
        ptr, out = C.addressof(one), []
        for one.id, size in regs:
            if _ioctl(self.fd, K.KVM_GET_ONE_REG, ptr) < 0:
                _failed(K.KVM_GET_ONE_REG)
            out.append(buf.raw[:size])
        return out

    def set_one_regs(self, regs: Iterable[tuple[int, bytes]]) -> None:
        """Set registers by (id, value) pairs, in order; each value as many bytes as its id says."""
        one = S.kvm_one_reg()
        ptr = C.addressof(one)
        for one.id, value in regs:
            buf = C.create_string_buffer(value, len(value))     # ctypes keeps it while it runs
            one.addr = C.addressof(buf)
            if _ioctl(self.fd, K.KVM_SET_ONE_REG, ptr) < 0:
                _failed(K.KVM_SET_ONE_REG)

    def reg_list(self) -> list[int]:
        """The ids of every register KVM saves and restores for this vCPU (KVM_GET_REG_LIST)."""
        head = S.kvm_reg_list(n=0)
        try:
            ioctl(self.fd, K.KVM_GET_REG_LIST, head)        # E2BIG, with the count filled in
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        buf = (C.c_uint64 * (1 + head.n))(head.n)
        ioctl(self.fd, K.KVM_GET_REG_LIST, buf)
        return list(buf[1:1 + buf[0]])

    def close(self) -> None:
        del self.run
        self.run_map.close()
        os.close(self.fd)
