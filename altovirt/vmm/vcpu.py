"""vCPU threads: KVM_RUN, exit dispatch, and parking outside KVM_RUN.

Each vCPU runs on its own thread. To get a vCPU out of KVM_RUN (to pause
it, or to stop the VM) we set ``kvm_run.immediate_exit`` and send the thread
KICK_SIGNAL: a vCPU about to enter KVM_RUN returns at once, one inside it
returns with EINTR. A paused vCPU waits on a condition variable, so
:meth:`VcpuThread.pause` returning means the vCPU is out of KVM_RUN and its
registers can be read or written (by snapshots, or QMP queries).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..devices.bus import Bus
from ..kvm import KvmError, Vcpu
from ..kvm import ioctls as K
from ..kvm import structs as S
from ..sandbox import seccomp

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1

# The kvm_run fields read on every exit, unpacked straight from the shared mapping
# (cheaper than ctypes attribute access); offsets come from the ctypes mirror.
_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_AT = S.offsetof(S.kvm_run, "exit_reason")
_IO = struct.Struct("<BBHIQ")               # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")             # phys_addr, data, len, is_write
_EXIT_AT = S.offsetof(S.kvm_run, "u")
_MMIO_DATA_AT = _EXIT_AT + S.offsetof(S.kvm_run_mmio, "data")


@dataclass(frozen=True)
class StopReason:
    """Why the VM stopped: the QMP SHUTDOWN reason, who asked, and our exit code."""

    reason: str
    guest: bool
    exit_code: int


GUEST_SHUTDOWN = StopReason("guest-shutdown", True, 0)
GUEST_RESET = StopReason("guest-reset", True, 0)
GUEST_PANIC = StopReason("guest-panic", True, 3)
HOST_ERROR = StopReason("host-error", False, 1)


def install_kick_handler() -> None:
    """A no-op handler, so the kick signal interrupts KVM_RUN instead of killing us.
    Must be called from the main thread before any vCPU starts."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def register_dump(vcpu: Vcpu) -> str:
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as e:
        return f"(registers unavailable: {e})"
    gp = " ".join(f"{n}={getattr(r, n):#x}" for n in (
        "rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"))
    return (f"{gp} cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} "
            f"cs={s.cs.selector:#x}/l={s.cs.l},db={s.cs.db}")


EXIT_NAMES = ("exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write")   # KVM_EXIT_IO_IN is 0


class VcpuThread:
    """Runs one vCPU. ``stop(reason)`` is called when this vCPU ends the VM."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, stop: Callable[[StopReason], None],
                 name: str = "vcpu{}") -> None:
        """``name``: the thread's, ``{}`` standing for the vCPU's index."""
        self.vcpu = vcpu
        self.index = vcpu.index
        self._pio = pio
        self._mmio = mmio
        self._stop_vm = stop
        self._cond = threading.Condition()
        self._pause_requested = False
        self._exit_requested = False
        self.paused = False
        self.thread_id = 0          # native thread id, for query-cpus
        # Exits to the VMM, by kind (EXIT_NAMES): Firecracker's "vcpu" metrics, counted since
        # the start (a list, so that counting costs the vCPU loop one indexed add).
        self.exits = [0, 0, 0, 0]
        self._thread = threading.Thread(target=self._main, name=name.format(self.index),
                                        daemon=True)

    # --- control, from other threads ---
    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        self.vcpu.run.immediate_exit = 1
        if self._thread.ident is not None and self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self._thread.ident, KICK_SIGNAL)

    def pause(self) -> None:
        """Return once this vCPU is parked outside KVM_RUN (or has ended)."""
        with self._cond:
            self._pause_requested = True
        self.kick()
        with self._cond:
            self._cond.wait_for(lambda: self.paused or not self._thread.is_alive())

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def end_soon(self) -> None:
        """Have this vCPU leave KVM_RUN and end, without waiting for it. Its own thread may
        ask: it finishes the current exit and runs no more guest code. The caller's seccomp
        role must allow tgkill (the kick)."""
        with self._cond:
            self._exit_requested = True
            self._cond.notify_all()
        self.kick()

    def exit(self, timeout: float = 5.0) -> None:
        self.end_soon()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("vCPU %d did not leave KVM_RUN within %.0f s", self.index, timeout)

    # --- the vCPU thread ---
    def _park(self) -> bool:
        """Wait while paused; False when the thread must end."""
        with self._cond:
            self.vcpu.run.immediate_exit = 0
            if self._pause_requested and not self._exit_requested:
                self.paused = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pause_requested or self._exit_requested)
                self.paused = False
            return not self._exit_requested

    def _main(self) -> None:
        self.thread_id = threading.get_native_id()
        try:
            seccomp.confine("vcpu")
            reason = self._loop()
        except Exception:
            log.exception("vCPU %d failed", self.index)
            reason = HOST_ERROR
        if reason is not None:
            self._stop_vm(reason)
        with self._cond:
            self.paused = False
            self._cond.notify_all()

    def _loop(self) -> StopReason | None:
        vcpu, run_map, exits = self.vcpu, self.vcpu.run_map, self.exits
        pio_read, pio_write = self._pio.read, self._pio.write
        while True:
            if self._pause_requested or self._exit_requested:
                # KVM finishes an MMIO or PIO exit's instruction only on the next KVM_RUN;
                # with immediate_exit set it does that and returns, so the registers are
                # consistent while parked (api.rst, KVM_EXIT_IO/KVM_EXIT_MMIO note).
                vcpu.run.immediate_exit = 1
                vcpu.run_once()
                if not self._park():
                    return None
            if vcpu.run_once():     # -EINTR (kicked) or -EAGAIN: look at the flags again
                continue
            reason = _EXIT_REASON.unpack_from(run_map, _EXIT_REASON_AT)[0]
            if reason == K.KVM_EXIT_IO:
                direction, size, port, count, off = _IO.unpack_from(run_map, _EXIT_AT)
                exits[direction] += 1
                for _ in range(count):
                    if direction == K.KVM_EXIT_IO_OUT:
                        pio_write(port, size, int.from_bytes(run_map[off:off + size], "little"))
                    else:
                        run_map[off:off + size] = pio_read(port, size).to_bytes(size, "little")
                    off += size
            elif reason == K.KVM_EXIT_MMIO:
                addr, data, length, is_write = _MMIO.unpack_from(run_map, _EXIT_AT)
                exits[2 + bool(is_write)] += 1
                if is_write:
                    self._mmio.write(addr, length, int.from_bytes(data[:length], "little"))
                else:
                    value = self._mmio.read(addr, length)
                    run_map[_MMIO_DATA_AT:_MMIO_DATA_AT + length] = value.to_bytes(length, "little")
            elif reason == K.KVM_EXIT_INTR:
                continue
            else:
                stop = self._exit_reason(reason)
                if stop is not None:
                    return stop

    def _exit_reason(self, reason: int) -> StopReason | None:
        """Exits that end the VM (or are not expected at all)."""
        vcpu = self.vcpu
        if reason == K.KVM_EXIT_SHUTDOWN:
            # A triple fault: Linux's reboot=t relies on it, so like QEMU we call it a reset.
            log.info("vCPU %d: triple fault (KVM_EXIT_SHUTDOWN), treated as a guest reset: %s",
                     self.index, register_dump(vcpu))
            return GUEST_RESET
        if reason == K.KVM_EXIT_SYSTEM_EVENT:
            kind = vcpu.run.u.system_event.type
            if kind == K.KVM_SYSTEM_EVENT_RESET:
                return GUEST_RESET
            if kind == K.KVM_SYSTEM_EVENT_CRASH:
                return GUEST_PANIC
            return GUEST_SHUTDOWN
        if reason == K.KVM_EXIT_HLT:
            log.info("vCPU %d halted with interrupts off; the guest is done", self.index)
            return GUEST_SHUTDOWN
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            fe = vcpu.run.u.fail_entry
            log.error("vCPU %d: KVM_EXIT_FAIL_ENTRY (hardware reason %#x on cpu %d): %s", self.index,
                      fe.hardware_entry_failure_reason, fe.cpu, register_dump(vcpu))
            return HOST_ERROR
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            ie = vcpu.run.u.internal
            data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            log.error("vCPU %d: KVM_EXIT_INTERNAL_ERROR suberror %d [%s]: %s", self.index,
                      ie.suberror, data, register_dump(vcpu))
            return HOST_ERROR
        log.error("vCPU %d: unexpected exit reason %d: %s", self.index, reason, register_dump(vcpu))
        return HOST_ERROR
