"""The saved state of PCI bridges (see :mod:`altovirt.persist`); imported only when state is
saved or restored."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RootPortState:
    """A root port's configuration space as the guest left it: bus numbers, bridge windows,
    MSI message, and the slot's control and status."""

    config: bytes
