"""Debian packages for the test bed, fetched with ``apt-get download`` and unpacked into a cache.

Nothing here is committed to the repository: the kernel, its modules and busybox come from
Debian's archive at test time, keyed by package version so a newer kernel is fetched when
Debian publishes one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("ALTOVIRT_TESTBED_CACHE", "/var/cache/altovirt-testbed"))
# The meta-package whose dependency names the current kernel image package.
KERNEL_META = "linux-image-amd64"


class PackageError(RuntimeError):
    """A package cannot be found, downloaded or unpacked; the message is one line."""


def _run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PackageError(f"{cmd[0]}: not installed (run ./scripts/setup)") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no message"])[-1]
        raise PackageError(f"{' '.join(cmd)}: {last}")
    return p.stdout


def candidate(name: str) -> str:
    """The version apt would install; runs ``apt-get update`` once if the lists lack it."""
    for attempt in range(2):
        out = _run("apt-cache", "policy", name)
        for line in out.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Candidate" and value and value != "(none)":
                return value
        if attempt == 0:
            _run("apt-get", "update", "-qq")
    raise PackageError(f"{name}: no installable version in the apt lists")


def unpack(name: str) -> Path:
    """The root of package ``name`` unpacked (``dpkg-deb -x``), downloading it if needed."""
    version = candidate(name)
    root = CACHE / "pkgs" / f"{name}_{version.replace(':', '%3a')}"
    if root.is_dir():
        return root
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run("apt-get", "download", "-qq", f"{name}={version}", cwd=debs)
    deb = next(debs.glob(f"{name}_*.deb"), None)
    if deb is None:
        raise PackageError(f"{name}: apt-get download left no .deb in {debs}")
    tmp = root.with_name(root.name + ".tmp")
    _run("rm", "-rf", str(tmp))
    tmp.mkdir(parents=True)
    _run("dpkg-deb", "-x", str(deb), str(tmp))
    tmp.rename(root)            # complete or absent: a killed run leaves only .tmp behind
    deb.unlink()
    return root


@dataclass(frozen=True)
class Kernel:
    """Debian's stock kernel: its release (``6.1.0-57-amd64``), image and module tree."""

    release: str
    vmlinuz: Path
    modules: Path               # .../lib/modules/<release>


def kernel() -> Kernel:
    """The kernel that ``linux-image-amd64`` currently depends on, unpacked."""
    deps = _run("apt-cache", "depends", KERNEL_META)
    image = next((line.split(":", 1)[1].strip() for line in deps.splitlines()
                  if line.strip().startswith("Depends: linux-image-")), None)
    if image is None:
        candidate(KERNEL_META)          # refreshes the lists if they were missing
        deps = _run("apt-cache", "depends", KERNEL_META)
        image = next((line.split(":", 1)[1].strip() for line in deps.splitlines()
                      if line.strip().startswith("Depends: linux-image-")), None)
    if image is None:
        raise PackageError(f"{KERNEL_META}: names no linux-image package")
    root = unpack(image)
    release = image.removeprefix("linux-image-")
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    modules = root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not modules.is_dir():
        raise PackageError(f"{image}: no boot/vmlinuz-{release} or lib/modules/{release}")
    return Kernel(release, vmlinuz, modules)


def depmod(k: Kernel) -> Path:
    """``modules.dep`` of ``k``, running ``depmod`` on its unpacked tree once.

    The package ships no dependency files. Safe when several processes call it at once: they
    serialise on a lock file, and ``.depmod-done`` is written only after depmod succeeded, so a
    killed run is simply redone.
    """
    # imported here: the rest of the module has no use for it
    import fcntl

    done = k.modules / ".depmod-done"
    if done.is_file():
        return k.modules / "modules.dep"
    with open(k.modules / ".depmod-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            _run("depmod", "-b", str(k.modules.parent.parent.parent), k.release)
            done.touch()
    return k.modules / "modules.dep"


def module_name(path: str) -> str:
    """``kernel/fs/9p/9p.ko`` -> ``9p``, with dashes as underscores, as the kernel compares names."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def load_order(k: Kernel, names: Iterable[str]) -> list[str]:
    """The .ko paths (relative to ``k.modules``) of modules ``names`` and everything they depend
    on (modules.dep), each after its dependencies; names built into the kernel are skipped.
    PackageError names a module that is neither."""
    deps: dict[str, list[str]] = {}
    for line in depmod(k).read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()
    by_name = {module_name(path): path for path in deps}
    builtin = {module_name(line) for line in (k.modules / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path not in order:
            for need in deps[path]:     # modules.dep names the whole closure; recursion orders it
                visit(need)
            order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise PackageError(f"kernel {k.release}: no module {name} (and it is not built in)")
    return order
