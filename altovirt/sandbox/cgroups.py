"""The jail's cgroups: ``<hierarchy>/altovirt/<id>`` in cgroup v1 or v2.

A setting is a control file and its value, as in ``cpu.shares=512`` or
``memory.max=256M``; the part before the first dot names the controller
(``cgroup.*`` files exist without one in v2). In v1 each controller has
a hierarchy of its own and the jail joins only the ones its settings name; in
v2 there is one hierarchy, and the controllers are enabled down to the jail
through the ``cgroup.subtree_control`` of its parents.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

from ..errors import AltoVirtError

PARENT = "altovirt"
# Mount options of a v1 hierarchy that are not controllers.
_V1_OPTIONS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "clone_children",
               "noprefix", "xattr", "cpuset_v2_mode"}


class CgroupError(AltoVirtError):
    """A setting that cannot be applied, or a cgroup that cannot be removed; one line."""


@dataclass(frozen=True)
class Hierarchy:
    mount: str
    version: int
    controllers: frozenset[str]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def hierarchies(mountinfo: str = "/proc/self/mountinfo") -> list[Hierarchy]:
    found = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            point = _unescape(left.split()[4])
            if fstype == "cgroup":
                names = {o for o in options.split(",") if o not in _V1_OPTIONS and "=" not in o}
                found.append(Hierarchy(point, 1, frozenset(names)))
            elif fstype == "cgroup2":
                try:
                    with open(os.path.join(point, "cgroup.controllers")) as c:
                        names = set(c.read().split())
                except OSError:
                    names = set()
                found.append(Hierarchy(point, 2, frozenset(names)))
    return found


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class JailCgroups:
    """The cgroups of jail ``jail_id`` under one cgroup version."""

    def __init__(self, jail_id: str, version: int, settings: list[tuple[str, str]],
                 found: list[Hierarchy] | None = None) -> None:
        self.jail_id = jail_id
        self.version = version
        self.hierarchies = hierarchies() if found is None else found
        # hierarchy mount -> [(file, value)]; checked before anything is created.
        self.plan: dict[str, list[tuple[str, str]]] = {}
        for key, value in settings:
            self.plan.setdefault(self._hierarchy_for(key).mount, []).append((key, value))

    def _hierarchy_for(self, key: str) -> Hierarchy:
        controller = key.split(".", 1)[0]
        if "/" in key or "." not in key or key.startswith("."):
            raise CgroupError(f"--cgroup {key}: expected a control file name such as cpu.shares")
        mine = [h for h in self.hierarchies if h.version == self.version]
        if self.version == 2:
            if not mine:
                raise CgroupError("--cgroup-version 2: this host has no cgroup2 mount")
            if controller != "cgroup" and controller not in mine[0].controllers:
                have = ", ".join(sorted(mine[0].controllers)) or "none"
                raise CgroupError(f"--cgroup {key}: the cgroup v2 hierarchy has no {controller} "
                                  f"controller (available: {have})")
            return mine[0]
        for h in mine:
            if controller in h.controllers:
                return h
        have = ", ".join(sorted(c for h in mine for c in h.controllers)) or "none"
        raise CgroupError(f"--cgroup {key}: no cgroup v1 hierarchy has the {controller} controller "
                          f"(mounted: {have}; use --cgroup-version 2 for v2)")

    def path(self, mount: str) -> str:
        return os.path.join(mount, PARENT, self.jail_id)

    def apply(self, pid: int) -> None:
        """Create the jail's cgroups, write the settings and move ``pid`` in."""
        for mount, settings in self.plan.items():
            parent = os.path.join(mount, PARENT)
            try:
                for d in (parent, self.path(mount)):
                    if not os.path.isdir(d):
                        os.mkdir(d, 0o755)
                        self._inherit_cpuset(d)
                    if self.version == 2 and d == parent:
                        self._enable_controllers(mount, {k.split(".", 1)[0] for k, _ in settings})
                for key, value in settings:
                    _write(os.path.join(self.path(mount), key), value)
                _write(os.path.join(self.path(mount), "cgroup.procs"), str(pid))
            except OSError as e:
                where = e.filename or mount
                raise CgroupError(f"cgroup {where}: {e.strerror}") from e

    @staticmethod
    def _inherit_cpuset(d: str) -> None:
        """A new v1 cpuset cgroup has no CPUs and no memory nodes, and nothing can join it
        until it has some: start from its parent's."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = os.path.join(d, name)
            if os.path.exists(mine) and not _read(mine):
                _write(mine, _read(os.path.join(os.path.dirname(d), name)))

    def _enable_controllers(self, mount: str, controllers: set[str]) -> None:
        wanted = " ".join(f"+{c}" for c in sorted(controllers - {"cgroup"}))
        if wanted:
            for d in (mount, os.path.join(mount, PARENT)):
                _write(os.path.join(d, "cgroup.subtree_control"), wanted)

    def remove(self) -> None:
        """Remove this jail's cgroup in every hierarchy (whatever the version it was made
        with), and the shared parent once it is empty."""
        for h in self.hierarchies:
            d = self.path(h.mount)
            if not os.path.isdir(d):
                continue
            try:
                os.rmdir(d)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise CgroupError(f"cgroup {d} still has processes") from e
                raise CgroupError(f"cgroup {d}: {e.strerror}") from e
            with contextlib.suppress(OSError):      # other jails still use it
                os.rmdir(os.path.dirname(d))
