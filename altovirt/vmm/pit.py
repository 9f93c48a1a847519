"""The PIT's lost ticks: dropped rather than reinjected, and set so off the VMM's paths.

KVM's in-kernel PIT reinjects the ticks a guest missed, by default. Turning that off
(KVM_REINJECT_CONTROL) waits for two SRCU grace periods, some 15 ms on these hosts, and
KVM turns it off itself when it destroys a VM: left on, it would delay every exit of the
VMM by as much. :class:`LostTicks` turns it off on a thread of its own once the VM's state
is in place (KVM_SET_PIT2 waits for it), while the guest runs. Missed ticks are then
dropped, as with QEMU's ``lost_tick_policy=discard``: Linux keeps time with kvmclock and
the TSC, and uses the PIT at most to calibrate at boot. A machine without a PIT (arm64)
has nothing to turn off.
"""

from __future__ import annotations

import logging
import threading

from .. import arch
from ..kvm import KvmError, Vm
from ..sandbox import seccomp

log = logging.getLogger(__name__)


class LostTicks:
    """Made at build: no thread can be created once the seccomp filters are on."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._go = threading.Event()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="pit", daemon=True)
        if arch.MACHINE == "x86_64":
            self._thread.start()

    def discard(self) -> None:
        """Turn reinjection off now, on the thread: the VM's state is in place."""
        self._go.set()

    def close(self) -> None:
        """Wait for the thread; if :meth:`discard` was never called, it does nothing."""
        self._cancelled = not self._go.is_set()
        self._go.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        self._go.wait()
        if self._cancelled:
            return
        seccomp.confine("main")
        try:
            self._vm.set_pit_reinject(False)
        except KvmError as e:           # KVM's default stays: missed ticks are reinjected
            log.warning("PIT: cannot drop missed ticks: %s", e)
