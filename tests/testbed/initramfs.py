"""The initramfs of the Linux test guest: busybox, Debian's modules, our init and test programs.

``build(kernel)`` returns a gzip'd newc cpio for ``-initrd``. It is written by this module (no
``cpio`` tool, no root: device nodes are plain archive entries) with every timestamp and owner
fixed, so the same inputs give the same bytes, and it is cached under ``CACHE/initramfs`` by a
hash of everything that goes into it. The guest side lives in ``tests/linux/guest``: ``init``
(PID 1, a busybox script) and small C programs compiled here with ``gcc -static``.

The kernel's architecture (``kernel.arch``) chooses the busybox, the compiler
(``aarch64-linux-gnu-gcc`` for arm64) and the default modules (:mod:`.arch`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import arch as arches
from . import cpio, debian

GUEST_SRC = Path(__file__).resolve().parent.parent / "linux" / "guest"
# Bump when the archive's layout changes in a way the content hash cannot see.
FORMAT = 2
# The x86_64 guest's modules, loaded by the init in this order (why: arch.X86_64); each
# architecture has its own list (Arch.guest_modules).
DEFAULT_MODULES: tuple[str, ...] = arches.X86_64.guest_modules


class BuildError(RuntimeError):
    """The initramfs cannot be built (a module, a compiler error); the message says which."""


def _module_files(kernel: debian.Kernel, paths: list[str]) -> dict[str, cpio.Entry]:
    """The .ko files under lib/modules/<release>, with modules.dep and modules.alias cut down to
    them (busybox modprobe reads both; entries for absent modules would only mislead it)."""
    base = f"lib/modules/{kernel.release}"
    keep = set(paths)
    out = {f"{base}/{p}": cpio.file((kernel.modules / p).read_bytes()) for p in paths}
    dep_lines = [line for line in debian.depmod(kernel).read_text().splitlines()
                 if line.partition(":")[0] in keep]
    names = {debian.module_name(p) for p in paths}
    alias_lines = [line for line in (kernel.modules / "modules.alias").read_text().splitlines()
                   if line.startswith("alias ") and line.split()[-1].replace("-", "_") in names]
    out[f"{base}/modules.dep"] = cpio.file("".join(f"{x}\n" for x in dep_lines).encode())
    out[f"{base}/modules.alias"] = cpio.file("".join(f"{x}\n" for x in alias_lines).encode())
    out[f"{base}/modules.builtin"] = cpio.file((kernel.modules / "modules.builtin").read_bytes())
    return out


def _busybox(arch: arches.Arch) -> dict[str, cpio.Entry]:
    """busybox-static at /bin/busybox and a symlink per applet where Debian's build puts it."""
    binary, applets = debian.busybox(arch.deb)
    out = {"bin/busybox": cpio.file(binary.read_bytes(), 0o755)}
    for applet in applets:
        if applet != "bin/busybox":
            out[applet] = cpio.symlink("/bin/busybox")
    return out


def compile_programs(arch: arches.Arch = arches.X86_64) -> dict[str, Path]:
    """Each ``tests/linux/guest/*.c`` built with ``gcc -static -O2`` (``arch.gcc``, a cross
    compiler for arm64): {program name: binary}.

    Binaries are cached under ``CACHE/guest-bin`` by a hash of the source and gcc's version (which
    names its target), so an edit rebuilds only that program. Raises BuildError with gcc's
    messages on failure, or when the compiler is missing.
    """
    try:
        gcc = subprocess.run([arch.gcc, "--version"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        raise BuildError(f"{arch.gcc}: not installed (run ./scripts/setup)") from None
    out: dict[str, Path] = {}
    for src in sorted(GUEST_SRC.glob("*.c")):
        key = hashlib.sha256(gcc.encode() + src.read_bytes()).hexdigest()[:16]
        binary = debian.CACHE / "guest-bin" / f"{src.stem}-{key}"
        if not binary.is_file():
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
            p = subprocess.run([arch.gcc, "-static", "-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra",
                                "-Werror", "-o", str(tmp), str(src)], capture_output=True, text=True,
                               check=False)
            if p.returncode != 0:
                raise BuildError(f"{arch.gcc} {src.name}:\n{p.stderr.strip()}")
            tmp.rename(binary)          # atomic: concurrent builds of the same source agree
        out[src.stem] = binary
    return out


def _extra_files(extra: Mapping[str, Path | bytes]) -> dict[str, cpio.Entry]:
    """The caller's files: a Path keeps its mode (a directory is taken whole), bytes are 0755
    when they start with ``#!`` and 0644 otherwise."""
    out: dict[str, cpio.Entry] = {}
    for dest, src in extra.items():
        dest = dest.strip("/")
        if isinstance(src, bytes):
            out[dest] = cpio.file(src, 0o755 if src.startswith(b"#!") else 0o644)
        elif src.is_dir():
            out[dest] = cpio.directory()
            for path in sorted(src.rglob("*")):
                rel = f"{dest}/{path.relative_to(src)}"
                out[rel] = (cpio.directory() if path.is_dir()
                            else cpio.file(path.read_bytes(), path.stat().st_mode & 0o777))
        else:
            out[dest] = cpio.file(src.read_bytes(), src.stat().st_mode & 0o777)
    return out


def _tree(kernel: debian.Kernel, modules: list[str],
          extra: Mapping[str, Path | bytes]) -> dict[str, cpio.Entry]:
    """Every member of the archive by path (no leading ``/``); cpio.archive adds the parents."""
    files: dict[str, cpio.Entry] = {
        "dev/console": cpio.chardev(5, 1),              # the kernel opens it before init runs
        "dev/null": cpio.chardev(1, 3, 0o666),
    }
    for d in ("proc", "sys", "dev", "run", "mnt", "root", "var/log", "etc"):
        files[d] = cpio.directory()
    files["tmp"] = cpio.directory(0o1777)
    arch = arches.get(kernel.arch)
    files.update(_busybox(arch))
    files.update(_module_files(kernel, debian.load_order(kernel, modules)))
    files["etc/guest/modules"] = cpio.file("".join(f"{m}\n" for m in modules).encode())
    files["init"] = cpio.file((GUEST_SRC / "init").read_bytes(), 0o755)
    files["etc/guest/shell"] = cpio.file((GUEST_SRC / "shell").read_bytes(), 0o755)
    for name, binary in compile_programs(arch).items():
        files[f"bin/{name}"] = cpio.file(binary.read_bytes(), 0o755)
    files.update(_extra_files(extra))
    return files


def _digest(kernel: debian.Kernel, files: Mapping[str, cpio.Entry]) -> str:
    h = hashlib.sha256(f"{FORMAT} {kernel.release}\n".encode())
    for name in sorted(files):
        e = files[name]
        h.update(f"{name} {e.mode:o} {e.rdev} {len(e.data)}\n".encode())
        h.update(hashlib.sha256(e.data).digest())
    return h.hexdigest()[:24]


def build(kernel: debian.Kernel, *, modules: Iterable[str] | None = None,
          extra: Mapping[str, Path | bytes] | None = None) -> Path:
    """A gzip'd newc initramfs for ``kernel``, built once per distinct content and cached.

    ``modules`` (default: the kernel architecture's ``guest_modules``, for x86_64
    :data:`DEFAULT_MODULES`) are loaded by the init in the given order; their dependencies from modules.dep
    are added to the archive (and loaded by modprobe). ``extra`` maps a path inside the guest
    (``"etc/test.sh"`` or ``"/etc/test.sh"``) to a host file or directory, or to bytes. The
    returned file must not be modified; it may be shared by concurrent tests.
    """
    if modules is None:
        modules = arches.get(kernel.arch).guest_modules
    files = _tree(kernel, list(modules), extra or {})
    out = debian.CACHE / "initramfs" / f"initramfs-{_digest(kernel, files)}.cpio.gz"
    # mtime=0 and level 6: identical inputs give identical bytes, and fast enough to not matter
    return cpio.cached(out, lambda: gzip.compress(cpio.archive(files), compresslevel=6, mtime=0))
