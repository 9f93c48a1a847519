"""A foreign architecture's root for L1 (arm64): Debian's packages unpacked into one directory.

The x86 bed shares the host's own root with L1; an arm64 L1 cannot run the host's binaries, so
its root is built here from Debian's arm64 packages (``apt-get download`` + ``dpkg-deb -x``, no
maintainer scripts): busybox-static for the shell and the usual commands, Python 3.11 with its
standard library, pylibfdt (``import libfdt``, for device trees), iproute2's ``ip``, socat, e2fsprogs and
Xen's store tools,
and the C libraries they need, found by walking their Depends and Pre-Depends in apt's lists
(:data:`SKIP` lists what only maintainer scripts or documentation use).  On top of that:

- a symlink to busybox for each applet no package provides (so ``ip`` is iproute2's);
- /etc/passwd, /etc/group and /etc/hosts with root and localhost, and the mount points;
- the standard library compiled to bytecode here, with a Python of the same minor version:
  Debian compiles it in a maintainer script, and without it every start of Python in L1 would
  compile what it imports at emulated speed, into a tmpfs that ends with L1.

The root is built once per set of package versions and cached under
``CACHE/userland/<arch>-<hash>``, complete or absent (built beside it, then renamed).  L1 mounts
it read-only over 9p under a tmpfs overlay (tests/testbed/l1.py).
"""

from __future__ import annotations

import compileall
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import arch as arches
from . import debian

# Bump when what is built changes in a way the package versions cannot show.
FORMAT = 1
PYTHON = "3.11"                 # the version of Debian 12's python3, for the bytecode
# What L1's root holds, with their dependencies.  python3-minimal: /usr/bin/python3.
PACKAGES: tuple[str, ...] = (
    "busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "python3-minimal", "python3-libfdt", "libfdt1", "iproute2", "socat",
    # What tests/linux's devices module uses on the host side: ext4 images, Xen's store tools.
    "e2fsprogs", "xenstore-utils",
    # The reference VMM, QEMU's virt machine on L1's KVM (bench/linux.py --arch aarch64).
    "qemu-system-arm",
)
# Dependencies left out: used by maintainer scripts (which never run here), data files Python
# does without (mime types, inputrc, /etc/netconfig), documentation, and capabilities' tools.
SKIP = frozenset({
    "debconf", "debconf-2.0", "cdebconf", "dpkg", "perl-base", "perl", "tar", "install-info",
    "media-types", "mime-support", "mailcap", "readline-common", "libtirpc-common", "libcap2-bin",
    "gcc-12-base", "adduser", "passwd", "iso-codes", "libdrm-common",
})
# Where busybox's applets may go, in L1's PATH order: an applet is linked only when no package
# put a program of that name in any of them.
PATH_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
ETC: Mapping[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nkvm:x:36:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/hostname": "testbed-l1\n",
}
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "home", "var/tmp", "lib/modules")


def _bare(name: str) -> str:
    """``<libc6:arm64>`` -> ``libc6``."""
    return name.strip("<>").split(":")[0]


def _graph(roots: Iterable[str], deb: str) -> dict[str, list[list[str]]]:
    """What ``apt-cache depends --recurse`` says of ``roots`` (of ``deb``): for each package
    (as apt names it, ``libc6:arm64``), its Depends and Pre-Depends, each a list of
    alternatives; a virtual package's alternative is followed by its providers."""
    out = debian._run("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                      "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                      *(debian.qualified(r, deb) for r in roots))
    graph: dict[str, list[list[str]]] = {}
    deps: list[list[str]] = []
    alternative = False                 # the last dependency line ended in "or"
    for line in out.splitlines():
        if not line.startswith(" "):
            deps = graph.setdefault(line.strip(), [])
            alternative = False
        elif line.startswith("    "):     # a provider of the virtual package just named
            if deps:
                deps[-1].append(line.strip())
        else:
            kind, _, name = line.strip().partition(": ")
            if kind.lstrip("|") in ("Depends", "PreDepends"):
                if alternative and deps:
                    deps[-1].append(name)
                else:
                    deps.append([name])
                alternative = kind.startswith("|")
    return graph


def closure(roots: Iterable[str], deb: str) -> list[str]:
    """``roots`` and everything they depend on, as apt names them (``libc6:arm64``, or a bare
    name for an ``all`` package), less :data:`SKIP`; for each dependency the first alternative
    (or the first provider of a virtual one) that is not skipped."""
    roots = list(roots)
    graph = _graph(roots, deb)
    found: list[str] = []
    todo = [debian.qualified(r, deb) for r in roots]
    while todo:
        pkg = todo.pop(0)
        if pkg in found or _bare(pkg) in SKIP:
            continue
        found.append(pkg)
        for group in graph.get(pkg, []):
            names = [n for n in group if not n.startswith("<") and _bare(n) not in SKIP]
            if any(_bare(n) in SKIP for n in group) and not names:
                continue                # only skipped ways to satisfy it
            if not names:
                raise debian.PackageError(f"{pkg}: cannot satisfy {' | '.join(group)}")
            todo.append(names[0])
    return found


def versions(names: list[str]) -> dict[str, str]:
    """The candidate version of each package (as apt names it), with one ``apt-cache policy``."""
    out = debian._run("apt-cache", "policy", *names)
    got: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current is not None and line.strip().startswith("Candidate: "):
            got[current] = line.split(": ", 1)[1].strip()
    missing = [n for n in names if got.get(n, "(none)") == "(none)"]
    if missing:
        raise debian.PackageError(f"no installable version of {', '.join(missing)} (run ./scripts/setup)")
    return got


def root(arch: arches.Arch) -> Path:
    """The root directory for an L1 of ``arch`` (not the native one), built if needed."""
    deb = arch.deb
    pkgs = closure(PACKAGES, deb)
    try:
        wanted = versions(pkgs)
    except debian.PackageError:
        debian.candidate("busybox-static", deb)     # runs apt-get update once if the lists lack it
        wanted = versions(pkgs)
    key = hashlib.sha256(repr((FORMAT, sorted(wanted.items()), sorted(ETC.items()))).encode()).hexdigest()
    target = debian.CACHE / "userland" / f"{deb}-{key[:16]}"
    if target.is_dir():
        return target
    _, applets = debian.busybox(deb)
    tmp = debian.scratch(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, wanted, applets, deb)
        try:
            tmp.rename(target)
        except OSError:                 # another process built it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(tmp: Path, wanted: Mapping[str, str], applets: list[str], deb: str) -> None:
    """Fill ``tmp`` with the packages ``wanted`` ({apt name: version}) and the rest of the root."""
    # As apt names them: "name:arm64", or a bare name for an Architecture: all package, which
    # apt does not know as "name:arm64".
    names = list(wanted.items())
    where, files = debian.download(names)
    try:
        for (name, _), path in zip(names, files, strict=True):
            if not path.name.endswith((f"_{deb}.deb", "_all.deb")):
                raise debian.PackageError(f"{name}: {path.name} is not for {deb}")
            debian._run("dpkg-deb", "-x", str(path), str(tmp))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    for applet in applets:
        name = Path(applet).name
        if str(Path(applet).parent) in PATH_DIRS and not any(os.path.lexists(tmp / d / name)
                                                             for d in PATH_DIRS):
            (tmp / applet).parent.mkdir(parents=True, exist_ok=True)
            (tmp / applet).symlink_to("/bin/busybox")
    for d in MOUNT_POINTS:
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for d in ("tmp", "var/tmp"):
        (tmp / d).chmod(0o1777)
    for member, text in ETC.items():
        (tmp / member).write_text(text)
    (tmp / "etc" / "altovirt-testbed-packages").write_text(
        "".join(f"{n} {v}\n" for n, v in sorted(wanted.items())))
    _compile(tmp)


def _compile(tmp: Path) -> None:
    """Compile the root's Python to bytecode with a host Python of version :data:`PYTHON`
    (bytecode depends on the version, not the machine), recording the paths L1 will see."""
    python = sys.executable if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON \
        else shutil.which(f"python{PYTHON}")
    if python is None:
        return                          # L1 then compiles what it imports, more slowly
    dirs = [d for d in (f"usr/lib/python{PYTHON}", "usr/lib/python3/dist-packages") if (tmp / d).is_dir()]
    code = ("import compileall, sys\n"
            "for d in sys.argv[2:]:\n"
            "    compileall.compile_dir(sys.argv[1] + '/' + d, ddir='/' + d, quiet=2, workers=0)\n")
    if python == sys.executable:
        for d in dirs:
            compileall.compile_dir(str(tmp / d), ddir=f"/{d}", quiet=2, workers=0)
    else:
        subprocess.run([python, "-c", code, str(tmp), *dirs], check=False, capture_output=True)


def python_path(repo: Path) -> list[str]:
    """What L1's Python needs on PYTHONPATH to run the repository's code and tests with
    Debian's python3: ``repo``, the root's own packages (before the next, so that a package
    both have, such as libfdt, is the root's whole and not the virtualenv's Python half over
    the root's compiled half), and the pure-Python packages of the host's virtualenv
    (``repo/.venv``; compiled extensions in it are for the host and stay unused, being named
    for its machine)."""
    venv = sorted((repo / ".venv" / "lib").glob("python3*/site-packages"))
    preferred = [p for p in venv if p.parent.name == f"python{PYTHON}"] or venv
    return [str(repo), "/usr/lib/python3/dist-packages", *(str(p) for p in preferred[:1])]
