"""Message-signalled interrupts through KVM: one GSI a vector, routed as MSI, raised by an
irqfd (KVM_SET_GSI_ROUTING, KVM_IRQFD); and the INTx lines of a guest without MSI, a
level-triggered irqfd each (KVM_IRQFD_FLAG_RESAMPLE).

KVM's routing table is set whole, so :class:`GsiRoutes` keeps it: the routes KVM sets up
with its in-kernel PIC and IOAPIC (which the first KVM_SET_GSI_ROUTING would otherwise drop),
then the vectors' MSI routes. A vector without a route (masked, or MSI-X off) has its irqfd
unbound; KVM looks at the eventfd when it is bound again and delivers what waited.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from ..devices.pci.msix import MsiMessage
from ..kvm import Vm
from ..kvm import ioctls as K
from ..kvm import structs as S

log = logging.getLogger(__name__)

MAX_ROUTES = 4096                   # KVM_MAX_IRQ_ROUTES
KVM_MSI_VALID_DEVID = 1             # an MSI route's flag: u.msi.devid names the requester (arm64's ITS)


class GsiRoutes:
    """The VM's GSI routing table: the routes KVM sets up for its interrupt controller
    (``irqchip``: (GSI, chip, pin) each, :func:`altovirt.arch.irqchip_routes`), then MSI
    routes, each with the requester ID of its function where the controller needs it."""

    def __init__(self, vm: Vm, irqchip: Sequence[tuple[int, int, int]]) -> None:
        self.vm = vm
        # arm64's ITS tells devices apart by their requester IDs (KVM_CAP_MSI_DEVID).
        self.needs_devid = bool(vm.check_extension(K.KVM_CAP_MSI_DEVID))
        self._irqchip = [_irqchip(*route) for route in irqchip]
        self._msi: dict[int, tuple[MsiMessage, int | None]] = {}
        first = max((gsi for gsi, _, _ in irqchip), default=-1) + 1
        self._free = list(range(MAX_ROUTES - 1, first - 1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise ValueError(f"no GSI left for MSI (KVM routes {MAX_ROUTES})")
        return self._free.pop()

    def release(self, gsi: int) -> None:
        self._msi.pop(gsi, None)
        self._free.append(gsi)

    def set(self, gsi: int, message: MsiMessage, devid: int | None = None) -> None:
        self._msi[gsi] = message, devid
        self.vm.set_gsi_routing(self._table())

    def _table(self) -> list[S.kvm_irq_routing_entry]:
        table = list(self._irqchip)
        for gsi, (m, devid) in sorted(self._msi.items()):
            entry = S.kvm_irq_routing_entry(gsi=gsi, type=K.KVM_IRQ_ROUTING_MSI)
            entry.u.msi.address_lo, entry.u.msi.address_hi, entry.u.msi.data = m
            if devid is not None:
                entry.flags, entry.u.msi.devid = KVM_MSI_VALID_DEVID, devid
            table.append(entry)
        return table


def _irqchip(gsi: int, chip: int, pin: int) -> S.kvm_irq_routing_entry:
    entry = S.kvm_irq_routing_entry(gsi=gsi, type=K.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
    return entry


class Vectors:
    """A function's ``count`` MSI-X vectors (:class:`altovirt.devices.pci.msix.MsiVectors`):
    an eventfd and a GSI each; ``devid()`` is the function's requester ID, for an interrupt
    controller that tells devices apart (arm64's ITS)."""

    def __init__(self, routes: GsiRoutes, count: int, devid: Callable[[], int] | None = None) -> None:
        self.routes = routes
        self._devid = devid
        self.fds: list[int] = []
        self.gsis: list[int] = []
        self._bound: list[bool] = []
        try:
            for _ in range(count):
                self.gsis.append(routes.allocate())
                self.fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                self._bound.append(False)
        except Exception:
            self.close()
            raise

    def route(self, vector: int, message: MsiMessage | None) -> None:
        fd, gsi = self.fds[vector], self.gsis[vector]
        if message is None:
            if self._bound[vector]:
                self.routes.vm.irqfd(fd, gsi, deassign=True)
                self._bound[vector] = False
            return
        # Before binding: KVM delivers what waits at once.
        self.routes.set(gsi, message, self._devid() if self._devid and self.routes.needs_devid else None)
        if not self._bound[vector]:
            self.routes.vm.irqfd(fd, gsi)
            self._bound[vector] = True

    def close(self) -> None:
        for vector in range(len(self.fds)):
            self.route(vector, None)
            os.close(self.fds[vector])
        for gsi in self.gsis:
            self.routes.release(gsi)
        self.fds.clear()
        self.gsis.clear()


class IntxLine:
    """A function's INTx# on IOAPIC pin ``gsi`` (:class:`altovirt.devices.pci.intx.IntxLine`):
    a write to ``fd`` raises the pin until the guest's EOI, which ``resample_fd`` reports.
    Functions sharing a pin each have their own pair: at an EOI KVM lowers the pin and tells
    each of them, and those that still want it raise it again."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm, self.gsi = vm, gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.resample_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(self.fd, gsi, resample_fd=self.resample_fd)
        except Exception:
            self._close_fds()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            self.vm.irqfd(self.fd, self.gsi, deassign=True)
            self._close_fds()

    def _close_fds(self) -> None:
        os.close(self.fd)
        os.close(self.resample_fd)
        self.fd = self.resample_fd = -1
