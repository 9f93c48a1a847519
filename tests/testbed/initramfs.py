"""The initramfs of the Linux test guest: busybox, Debian's modules, our init and test programs.

``build(kernel)`` returns a gzip'd newc cpio for ``-initrd``. It is written by this module (no
``cpio`` tool, no root: device nodes are plain archive entries) with every timestamp and owner
fixed, so the same inputs give the same bytes, and it is cached under ``CACHE/initramfs`` by a
hash of everything that goes into it. The guest side lives in ``tests/linux/guest``: ``init``
(PID 1, a busybox script) and small C programs compiled here with ``gcc -static``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import debian

GUEST_SRC = Path(__file__).resolve().parent.parent / "linux" / "guest"
# Bump when the archive's layout changes in a way the content hash cannot see.
FORMAT = 1
# Loaded by the init in this order. The bus (virtio_mmio) first so the device drivers that
# follow find their devices at once; evdev before button so acpid finds the power button's
# event node; crc32c_generic for ext4's metadata checksums (a softdep busybox modprobe does not
# follow; the SSE4.2 variant is left out as a CPU without SSE4.2 would fail to load it).
# af_packet, unix, ipv6, hw_random, the 8250 UART and the i8042 are built into Debian's kernel.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
    "vmw_vsock_virtio_transport", "crc32c_generic", "ext4", "evdev", "button",
)


class BuildError(RuntimeError):
    """The initramfs cannot be built (a module, a compiler error); the message says which."""


@dataclass(frozen=True)
class _Entry:
    """One archive member: a regular file (``data``), a directory, a symlink or a device node."""

    mode: int                   # st_mode, type bits included
    data: bytes = b""           # file content, or the symlink's target
    rdev: tuple[int, int] = (0, 0)


_DIR, _FILE, _LINK, _CHR = 0o040000, 0o100000, 0o120000, 0o020000


def _norm(name: str) -> str:
    """A module name as the kernel compares them: ``-`` and ``_`` are the same."""
    return name.replace("-", "_")


def _module_deps(kernel: debian.Kernel) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as {normalised name: (relative .ko path, [relative paths it needs])}."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in debian.depmod(kernel).read_text().splitlines():
        path, _, needs = line.partition(":")
        name = _norm(Path(path).name.split(".ko")[0])
        deps[name] = (path, needs.split())
    return deps


def module_closure(kernel: debian.Kernel, modules: Iterable[str]) -> list[str]:
    """The relative .ko paths of ``modules`` and everything they depend on, sorted.

    Raises BuildError naming a module that is neither in the tree nor built in (a module that
    is built into the kernel needs no file and is skipped).
    """
    deps = _module_deps(kernel)
    builtin = {_norm(Path(line).name.split(".ko")[0])
               for line in (kernel.modules / "modules.builtin").read_text().split()}
    by_path = {path: needs for path, needs in deps.values()}
    wanted: set[str] = set()
    for name in modules:
        if _norm(name) in deps:
            path, _ = deps[_norm(name)]
            wanted.add(path)
        elif _norm(name) not in builtin:
            raise BuildError(f"kernel {kernel.release}: no module {name} (and it is not built in)")
    todo = list(wanted)
    while todo:                         # modules.dep lists the full closure, but be safe
        for need in by_path[todo.pop()]:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return sorted(wanted)


def _module_files(kernel: debian.Kernel, paths: list[str]) -> dict[str, _Entry]:
    """The .ko files under lib/modules/<release>, with modules.dep and modules.alias cut down to
    them (busybox modprobe reads both; entries for absent modules would only mislead it)."""
    base = f"lib/modules/{kernel.release}"
    keep = set(paths)
    out = {f"{base}/{p}": _Entry(_FILE | 0o644, (kernel.modules / p).read_bytes()) for p in paths}
    dep_lines = [line for line in debian.depmod(kernel).read_text().splitlines()
                 if line.partition(":")[0] in keep]
    names = {_norm(Path(p).name.split(".ko")[0]) for p in paths}
    alias_lines = [line for line in (kernel.modules / "modules.alias").read_text().splitlines()
                   if line.startswith("alias ") and _norm(line.split()[-1]) in names]
    out[f"{base}/modules.dep"] = _Entry(_FILE | 0o644, "".join(f"{x}\n" for x in dep_lines).encode())
    out[f"{base}/modules.alias"] = _Entry(_FILE | 0o644, "".join(f"{x}\n" for x in alias_lines).encode())
    out[f"{base}/modules.builtin"] = _Entry(_FILE | 0o644, (kernel.modules / "modules.builtin").read_bytes())
    return out


def _busybox() -> dict[str, _Entry]:
    """busybox-static at /bin/busybox and a symlink per applet where Debian's build puts it."""
    binary = debian.unpack("busybox-static") / "bin" / "busybox"
    listing = subprocess.run([str(binary), "--list-full"], capture_output=True, text=True, check=True)
    out = {"bin/busybox": _Entry(_FILE | 0o755, binary.read_bytes())}
    for applet in listing.stdout.split():
        if applet != "bin/busybox":
            out[applet] = _Entry(_LINK | 0o777, b"/bin/busybox")
    return out


def compile_programs() -> dict[str, Path]:
    """Each ``tests/linux/guest/*.c`` built with ``gcc -static -O2``: {program name: binary}.

    Binaries are cached under ``CACHE/guest-bin`` by a hash of the source and gcc's version, so
    an edit rebuilds only that program. Raises BuildError with gcc's messages on failure.
    """
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False).stdout
    out: dict[str, Path] = {}
    for src in sorted(GUEST_SRC.glob("*.c")):
        key = hashlib.sha256(gcc.encode() + src.read_bytes()).hexdigest()[:16]
        binary = debian.CACHE / "guest-bin" / f"{src.stem}-{key}"
        if not binary.is_file():
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
            p = subprocess.run(["gcc", "-static", "-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra",
                                "-Werror", "-o", str(tmp), str(src)], capture_output=True, text=True,
                               check=False)
            if p.returncode != 0:
                raise BuildError(f"gcc {src.name}:\n{p.stderr.strip()}")
            tmp.rename(binary)          # atomic: concurrent builds of the same source agree
        out[src.stem] = binary
    return out


def _extra_files(extra: Mapping[str, Path | bytes]) -> dict[str, _Entry]:
    """The caller's files: a Path keeps its mode (a directory is taken whole), bytes are 0755
    when they start with ``#!`` and 0644 otherwise."""
    out: dict[str, _Entry] = {}
    for dest, src in extra.items():
        dest = dest.strip("/")
        if isinstance(src, bytes):
            out[dest] = _Entry(_FILE | (0o755 if src.startswith(b"#!") else 0o644), src)
        elif src.is_dir():
            out[dest] = _Entry(_DIR | 0o755)
            for path in sorted(src.rglob("*")):
                rel = f"{dest}/{path.relative_to(src)}"
                out[rel] = (_Entry(_DIR | 0o755) if path.is_dir()
                            else _Entry(_FILE | (path.stat().st_mode & 0o777), path.read_bytes()))
        else:
            out[dest] = _Entry(_FILE | (src.stat().st_mode & 0o777), src.read_bytes())
    return out


def _tree(kernel: debian.Kernel, modules: list[str], extra: Mapping[str, Path | bytes]) -> dict[str, _Entry]:
    """Every member of the archive by path (no leading ``/``); parent directories added later."""
    files: dict[str, _Entry] = {
        "dev/console": _Entry(_CHR | 0o600, rdev=(5, 1)),   # the kernel opens it before init runs
        "dev/null": _Entry(_CHR | 0o666, rdev=(1, 3)),
    }
    for d in ("proc", "sys", "dev", "run", "mnt", "root", "var/log", "etc"):
        files[d] = _Entry(_DIR | 0o755)
    files["tmp"] = _Entry(_DIR | 0o1777)
    files.update(_busybox())
    files.update(_module_files(kernel, module_closure(kernel, modules)))
    files["etc/guest/modules"] = _Entry(_FILE | 0o644, "".join(f"{m}\n" for m in modules).encode())
    files["init"] = _Entry(_FILE | 0o755, (GUEST_SRC / "init").read_bytes())
    files["etc/guest/shell"] = _Entry(_FILE | 0o755, (GUEST_SRC / "shell").read_bytes())
    for name, binary in compile_programs().items():
        files[f"bin/{name}"] = _Entry(_FILE | 0o755, binary.read_bytes())
    files.update(_extra_files(extra))
    for name in list(files):                            # every parent directory, once
        parent = Path(name).parent
        while str(parent) != ".":
            files.setdefault(str(parent), _Entry(_DIR | 0o755))
            parent = parent.parent
    return files


def _cpio(files: Mapping[str, _Entry]) -> bytes:
    """A newc archive of ``files``, parents before children, owner root, mtime 0."""
    out = bytearray()

    def member(ino: int, name: str, e: _Entry) -> None:
        fields = (ino, e.mode, 0, 0, 2 if e.mode & _DIR == _DIR else 1, 0, len(e.data), 0, 0,
                  e.rdev[0], e.rdev[1], len(name) + 1, 0)
        out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(e.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, name in enumerate(sorted(files), start=1):   # sorted: "a" comes before "a/b"
        member(ino, name, files[name])
    member(0, "TRAILER!!!", _Entry(0))
    return bytes(out)


def _digest(kernel: debian.Kernel, files: Mapping[str, _Entry]) -> str:
    h = hashlib.sha256(f"{FORMAT} {kernel.release}\n".encode())
    for name in sorted(files):
        e = files[name]
        h.update(f"{name} {e.mode:o} {e.rdev} {len(e.data)}\n".encode())
        h.update(hashlib.sha256(e.data).digest())
    return h.hexdigest()[:24]


def build(kernel: debian.Kernel, *, modules: Iterable[str] = DEFAULT_MODULES,
          extra: Mapping[str, Path | bytes] | None = None) -> Path:
    """A gzip'd newc initramfs for ``kernel``, built once per distinct content and cached.

    ``modules`` are loaded by the init in the given order; their dependencies from modules.dep
    are added to the archive (and loaded by modprobe). ``extra`` maps a path inside the guest
    (``"etc/test.sh"`` or ``"/etc/test.sh"``) to a host file or directory, or to bytes. The
    returned file must not be modified; it may be shared by concurrent tests.
    """
    files = _tree(kernel, list(modules), extra or {})
    out = debian.CACHE / "initramfs" / f"initramfs-{_digest(kernel, files)}.cpio.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    # mtime=0 and level 6: identical inputs give identical bytes, and fast enough to not matter
    tmp.write_bytes(gzip.compress(_cpio(files), compresslevel=6, mtime=0))
    tmp.rename(out)
    return out
