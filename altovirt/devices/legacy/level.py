"""A level-triggered interrupt output, as an Arm PrimeCell drives its GIC line."""

from __future__ import annotations

from collections.abc import Callable


class LevelLine:
    """Drives ``drive(level)`` only when the level changes. A device works out the new level
    under its lock (:meth:`change`) and drives the line after releasing it (:meth:`drive`), so
    that KVM_IRQ_LINE is never made with the device's lock held."""

    def __init__(self, drive: Callable[[bool], None]) -> None:
        self._drive = drive
        self._level = False

    def change(self, level: bool) -> bool | None:
        """The level to drive, or None if the line is already at it."""
        if level == self._level:
            return None
        self._level = level
        return level

    def drive(self, level: bool | None) -> None:
        """Drive what :meth:`change` answered (nothing for None)."""
        if level is not None:
            self._drive(level)
