"""The guest's reset line and buttons, as the requests press them (vmm/controller.py): a
machine reset (QMP system_reset), the ACPI power button or Ctrl-Alt-Del (system_powerdown,
Firecracker's SendCtrlAltDel). Each runs on the main thread under the lifecycle lock.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import arch
from ..errors import VmmError
from .lifecycle import RunState, StateError

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)


def reset(m: Machine) -> None:
    """Reset the machine as its reset line would (QMP system_reset): every virtio
    device reset, RAM cleared and the kernel loaded again, vCPUs and interrupt
    controllers back at power-on. A paused VM stays paused; RESET is announced."""
    life = m.lifecycle
    with life.lock:
        life.require(RunState.RUNNING, RunState.PAUSED)
        if life.migrating:
            raise StateError("a migration is in progress; migrate_cancel it first")
        try:
            m.boot.read_inputs()  # loaded from a snapshot: the kernel is read now
        except VmmError as e:
            raise StateError(f"cannot boot again: {e}") from e
        with m.held(vcpus=True, devices=True):
            m.devices.reset()  # before RAM goes: no device writes into it afterwards
            m.mem.discard()
            plan = m.boot.load(m.mem)
            if m.vmgenid is not None:
                m.vmgenid.write()  # the same VM: the same generation
            vcpus = [v.vcpu for v in m.vcpus]
            arch.restore_state(m.vm, vcpus, m.power_on, reset=True)
            arch.setup_boot_regs(vcpus[0], plan)
    log.info("system reset")
    life.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})


def powerdown(m: Machine) -> None:
    """Ask the guest to shut down: the ACPI power button, an Arm board's GPIO power button,
    or without either Ctrl-Alt-Del on the keyboard (as Firecracker does)."""
    with m.lifecycle.lock:
        m.lifecycle.require(RunState.RUNNING, RunState.PAUSED)
        # Announced before the press, as QEMU does: the guest may power off at once, and
        # its SHUTDOWN must come after.
        m.lifecycle.emit("POWERDOWN", {})
        if m.devices.acpi is not None:
            m.devices.acpi.press_power_button()
        elif m.devices.gpio is not None:
            m.devices.press_gpio_power_button()
        else:
            assert m.devices.i8042 is not None
            m.devices.i8042.ctrl_alt_del()


def ctrl_alt_del(m: Machine) -> None:
    """Press Ctrl-Alt-Del on the i8042 keyboard (Firecracker's SendCtrlAltDel). A board
    without one (arm64) refuses, as Firecracker does there."""
    with m.lifecycle.lock:
        m.lifecycle.require(RunState.RUNNING)
        if m.devices.i8042 is None:
            raise StateError(f"Ctrl-Alt-Del needs an i8042 keyboard, which an {arch.MACHINE} VM has not; "
                             "use system_powerdown")
        m.devices.i8042.ctrl_alt_del()
