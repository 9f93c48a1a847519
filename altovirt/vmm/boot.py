"""What a VM boots: its kernel, initrd, command line and firmware, read from the host at build,
or only at the first system_reset for a VM loaded from a snapshot (which boots nothing), and
loaded into guest RAM at each (re)boot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .. import arch
from ..errors import VmmError
from ..memory import GuestMemory

log = logging.getLogger(__name__)

# What arch.load_kernel takes besides RAM: the kernel image, the command line, the initrd,
# the vCPU count and the firmware.
BootInputs = tuple[bytes, str, bytes | None, int, arch.Firmware]


@dataclass
class Boot:
    """``read()`` reads the inputs (VmmError naming the file it cannot read); ``kernel`` is the
    kernel's path, for messages."""

    kernel: str
    read: Callable[[], BootInputs]
    inputs: BootInputs | None = None

    def read_inputs(self) -> None:
        """Read the inputs if they are not yet (VmmError if they cannot be)."""
        if self.inputs is None:
            self.inputs = self.read()

    def load(self, mem: GuestMemory) -> arch.BootPlan:
        """Load the kernel, initrd, command line and firmware into ``mem`` (the inputs read
        first if need be); the plan for the boot vCPU's registers. VmmError if the kernel is
        not one we can boot."""
        self.read_inputs()
        assert self.inputs is not None
        try:
            plan = arch.load_kernel(mem, *self.inputs)
        except arch.KernelError as e:
            raise VmmError(f"-kernel: {self.kernel}: {e}") from e
        log.info("kernel %s: %s format, entry %#x%s", self.kernel, plan.kind, plan.entry,
                 f", initrd at {plan.initrd_addr:#x}" if plan.initrd_size else "")
        return plan
