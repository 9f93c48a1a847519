"""Just enough of the i8042 keyboard controller for ``reboot=k``.

Linux (and the probe) reset the machine by writing 0xFE (pulse the reset
line) to the command port; we turn that into a VM stop with reason
"guest-reset". The controller's command byte and self test are answered so
that a probing driver finds a sane, empty controller. The reset line is also how
the reset vector's stub resets (:attr:`I8042.reset_register`), and the FADT says
that there is an 8042 (:attr:`I8042.boot_flags`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...acpi import aml
from ...acpi.tables import BOOT_8042, ResetRegister

if TYPE_CHECKING:
    from .persist import I8042State

DATA_PORT, COMMAND_PORT = 0x60, 0x64
I8042_IRQ = 1
I8042_HID = "PNP0303"      # an IBM enhanced (101/102-key) keyboard: what Linux's i8042 PnP driver matches
# Ctrl, Alt, Del pressed, in scan code set 2 (what Firecracker's SendCtrlAltDel sends).
CTRL_ALT_DEL = (0x14, 0x11, 0xE0, 0x71)
# Commands (Linux drivers/input/serio/i8042.h)
CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_SELF_TEST, CMD_KBD_TEST = 0xAA, 0xAB
CMD_DISABLE_KBD, CMD_ENABLE_KBD = 0xAD, 0xAE
CMD_RESET_CPU = 0xFE
STATUS_OBF = 0x01          # output buffer full: data for the guest at port 0x60
STATUS_SYS = 0x04          # system flag: self test passed
SELF_TEST_OK = 0x55
# A real controller holds one byte; a few more cover a key sequence (Ctrl-Alt-Del), and a
# guest that sends commands without reading the answers cannot grow the queue.
MAX_OUTPUT = 16


class I8042:
    """Ports 0x60 (offset 0) to 0x64 (offset 4)."""

    # Writing CMD_RESET_CPU to the command port pulses the reset line.
    reset_register = ResetRegister(COMMAND_PORT, CMD_RESET_CPU)
    # The FADT's IA-PC boot flag for a port 60/64 keyboard controller (ACPI 6.4, 5.2.9.3),
    # which Linux's i8042 driver reads (x86_platform.legacy.i8042) before it looks for one.
    boot_flags = BOOT_8042

    def __init__(self, reset: Callable[[], None], irq: Callable[[], None] | None = None) -> None:
        self._reset = reset
        self._irq = irq
        self.ctr = 0x00
        self._pending_cmd = 0
        self._lock = threading.Lock()
        self._out: collections.deque[int] = collections.deque()   # bytes for the guest at port 0x60

    def acpi_device(self) -> bytes:
        """The controller in the DSDT: a Device term for ``\\_SB`` with its data and command
        ports and the keyboard's ISA IRQ (ACPI 6.4, 6.4.2)."""
        return aml.device("PS2K", aml.name("_HID", aml.eisa_id(I8042_HID)),
                          aml.crs(aml.io_port(DATA_PORT, 1), aml.io_port(COMMAND_PORT, 1),
                                  aml.irq_no_flags(I8042_IRQ)))

    def save(self) -> I8042State:
        from .persist import I8042State  # only when saving: see persist's docstring
        with self._lock:
            return I8042State(self.ctr, self._pending_cmd, bytes(self._out))

    def restore(self, state: I8042State) -> None:
        from ...persist import check, check_int
        check_int(state.ctr, 0, 0xFF, "ctr")
        check(state.pending_cmd in (0, CMD_WRITE_CTR),
              f"pending command {state.pending_cmd!r} takes no data")
        check(len(state.out) <= MAX_OUTPUT, f"more than {MAX_OUTPUT} bytes waiting for the guest")
        with self._lock:
            self.ctr, self._pending_cmd = state.ctr, state.pending_cmd
            self._out = collections.deque(state.out)

    def _answer(self, byte: int) -> None:
        with self._lock:
            if len(self._out) < MAX_OUTPUT:
                self._out.append(byte)

    def ctrl_alt_del(self) -> None:
        """Put Ctrl-Alt-Del in the output buffer and raise the keyboard IRQ."""
        with self._lock:
            self._out.extend(CTRL_ALT_DEL[:MAX_OUTPUT - len(self._out)])
        if self._irq:
            self._irq()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == COMMAND_PORT - DATA_PORT:
                return STATUS_SYS | (STATUS_OBF if self._out else 0)
            if offset == 0:
                value = self._out.popleft() if self._out else 0
                more = bool(self._out)
            else:
                return 0xFF
        if more and self._irq:      # one byte per interrupt, as a real controller does
            self._irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND_PORT - DATA_PORT:
            if value == CMD_RESET_CPU:
                self._reset()
            elif value == CMD_READ_CTR:
                self._answer(self.ctr)
            elif value == CMD_WRITE_CTR:
                self._pending_cmd = value
            elif value == CMD_SELF_TEST:
                self._answer(SELF_TEST_OK)
            elif value == CMD_KBD_TEST:
                self._answer(0x00)
        elif offset == 0 and self._pending_cmd == CMD_WRITE_CTR:
            self.ctr = value
            self._pending_cmd = 0
