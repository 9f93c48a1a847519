"""Debian packages for the test bed, fetched with ``apt-get download`` and unpacked into a cache.

Nothing here is committed to the repository: the kernel, its modules and busybox come from
Debian's archive at test time, keyed by package version so a newer kernel is fetched when
Debian publishes one.  Packages of another architecture (``arch="arm64"``) need it added to
dpkg (``dpkg --add-architecture arm64``, as scripts/setup does) and are cached apart.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import arch as arches

CACHE = Path(os.environ.get("ALTOVIRT_TESTBED_CACHE", "/var/cache/altovirt-testbed"))
# The meta-package whose dependency names the current amd64 kernel image package.
KERNEL_META = arches.X86_64.kernel_meta


class PackageError(RuntimeError):
    """A package cannot be found, downloaded or unpacked; the message is one line."""


# apt-cache reads lists that an apt-get update elsewhere (on the host, which a native L1
# shares) may be rewriting: it then calls them corrupted until the update is done.
APT_CACHE_TRIES, APT_CACHE_WAIT = 6, 10.0


def _run(*cmd: str, cwd: Path | None = None) -> str:
    for attempt in range(APT_CACHE_TRIES if cmd[0] == "apt-cache" else 1):
        try:
            p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise PackageError(f"{cmd[0]}: not installed (run ./scripts/setup)") from None
        if p.returncode == 0:
            return p.stdout
        if "corrupted" not in p.stderr or attempt == APT_CACHE_TRIES - 1:
            break
        time.sleep(APT_CACHE_WAIT)
    last = (p.stderr.strip().splitlines() or ["no message"])[-1]
    raise PackageError(f"{' '.join(cmd)}: {last}")


@functools.cache
def native() -> str:
    """dpkg's own architecture (``amd64``)."""
    return _run("dpkg", "--print-architecture").strip()


def qualified(name: str, arch: str | None = None) -> str:
    """``name`` as apt names it in ``arch`` (None or the native one: ``name`` itself)."""
    return name if arch is None or arch == native() else f"{name}:{arch}"


def candidate(name: str, arch: str | None = None) -> str:
    """The version apt would install; runs ``apt-get update`` once if the lists lack it."""
    for attempt in range(2):
        out = _run("apt-cache", "policy", qualified(name, arch))
        for line in out.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Candidate" and value and value != "(none)":
                return value
        if attempt == 0:
            _run("apt-get", "update", "-qq")
    hint = f" (is {arch} a dpkg architecture? run ./scripts/setup)" if qualified(name, arch) != name else ""
    raise PackageError(f"{qualified(name, arch)}: no installable version in the apt lists{hint}")


def scratch(target: Path) -> Path:
    """A name beside ``target`` to build it under before renaming it into place: this process's
    and this thread's own (tests/test_linux.py runs test beds on two threads at once)."""
    return target.with_name(f"{target.name}.{os.getpid()}.{threading.get_native_id()}.tmp")


def download(packages: Iterable[tuple[str, str]], arch: str | None = None) -> tuple[Path, list[Path]]:
    """Download ``(name, version)`` packages of ``arch`` (None: as named, ``name:arm64`` or
    native) with one ``apt-get download`` into a
    fresh directory of their own under ``CACHE/debs``: (that directory, the .deb files in the
    order given).  The caller removes the directory.  A private directory, so that concurrent
    downloads (another test bed, another architecture) never take each other's files."""
    wanted = list(packages)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=debs))
    try:
        _run("apt-get", "download", "-qq", *(f"{qualified(n, arch)}={v}" for n, v in wanted), cwd=tmp)
        files = []
        for name, _ in wanted:
            deb = next(tmp.glob(f"{name.split(':')[0]}_*.deb"), None)
            if deb is None:
                raise PackageError(f"{qualified(name, arch)}: apt-get download left no .deb")
            files.append(deb)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, files


def unpack(name: str, arch: str | None = None) -> Path:
    """The root of package ``name`` (of ``arch``, default the native one) unpacked
    (``dpkg-deb -x``), downloading it if needed."""
    version = candidate(name, arch)
    suffix = "" if qualified(name, arch) == name else f"_{arch}"
    root = CACHE / "pkgs" / f"{name}_{version.replace(':', '%3a')}{suffix}"
    if root.is_dir():
        return root
    where, (deb,) = download([(name, version)], arch)
    try:
        tmp = scratch(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run("dpkg-deb", "-x", str(deb), str(tmp))
        try:
            tmp.rename(root)        # complete or absent: a killed run leaves only .tmp behind
        except OSError:             # another process unpacked it first
            if not root.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return root


def busybox(arch: str | None = None) -> tuple[Path, list[str]]:
    """busybox-static of ``arch``: its binary and where its applets go (``bin/ash``,
    ``usr/sbin/chroot``, ...; ``--list-full``).  A foreign binary cannot run here, so its
    list is the native package's, which Debian builds from the same configuration; the two
    must then be of the same upstream version."""
    binary = unpack("busybox-static", arch) / "bin" / "busybox"
    lister = binary
    if qualified("busybox-static", arch) != "busybox-static":
        lister = unpack("busybox-static") / "bin" / "busybox"
        ours, theirs = (candidate("busybox-static", a).split(":")[-1].split("-")[0] for a in (None, arch))
        if ours != theirs:
            raise PackageError(f"busybox-static {theirs} for {arch} but {ours} here: cannot list "
                               "its applets")
    listing = subprocess.run([str(lister), "--list-full"], capture_output=True, text=True, check=True)
    return binary, listing.stdout.split()


@dataclass(frozen=True)
class Kernel:
    """Debian's stock kernel: its release (``6.1.0-57-amd64``), image and module tree, and
    its architecture (:class:`.arch.Arch` ``name``).  On arm64 the image is an uncompressed
    ``Image`` (the EFI stub's "MZ" header, "ARMd" at 0x38), whatever its name says."""

    release: str
    vmlinuz: Path
    modules: Path               # .../lib/modules/<release>
    arch: str = arches.X86_64.name


def _image_package(meta: str, deb: str) -> str | None:
    """The linux-image package the meta-package ``meta`` of ``deb`` depends on, or None."""
    deps = _run("apt-cache", "depends", qualified(meta, deb))
    return next((line.split(":", 1)[1].strip().removesuffix(f":{deb}") for line in deps.splitlines()
                 if line.strip().startswith("Depends: linux-image-")), None)


def kernel(arch: arches.Arch = arches.X86_64) -> Kernel:
    """The kernel that ``arch``'s meta-package (``linux-image-amd64``) currently depends on,
    unpacked.  In a test bed's L1, the one the host named in ``TESTBED_KERNEL``
    (tests/testbed/l1.py), if it is of ``arch``: a foreign L1 has no apt, and a native one
    must not race the host's apt for its lists."""
    meta, deb = arch.kernel_meta, arch.deb
    given = os.environ.get("TESTBED_KERNEL")
    if given:
        vmlinuz = Path(given)
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if release.endswith(f"-{deb}"):
            return Kernel(release, vmlinuz, vmlinuz.parent.parent / "lib" / "modules" / release, arch.name)
    image = _image_package(meta, deb)
    if image is None:
        candidate(meta, deb)            # refreshes the lists if they were missing
        image = _image_package(meta, deb)
    if image is None:
        raise PackageError(f"{qualified(meta, deb)}: names no linux-image package")
    root = unpack(image, deb)
    release = image.removeprefix("linux-image-")
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    modules = root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not modules.is_dir():
        raise PackageError(f"{image}: no boot/vmlinuz-{release} or lib/modules/{release}")
    return Kernel(release, vmlinuz, modules, arch.name)


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
