"""newc ("070701") cpio archives, as the kernel's initramfs unpacker reads them, written here so
that no tool and no root is needed (device nodes are plain entries), and cached atomically."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import debian

DIR, FILE, LINK, CHR = 0o040000, 0o100000, 0o120000, 0o020000


@dataclass(frozen=True)
class Entry:
    """One member: a regular file (``data``), a directory, a symlink (``data`` is the target)
    or a device node (``rdev``); ``mode`` includes the type bits."""

    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def file(data: bytes, mode: int = 0o644) -> Entry:
    return Entry(FILE | mode, data)


def directory(mode: int = 0o755) -> Entry:
    return Entry(DIR | mode)


def chardev(major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(CHR | mode, rdev=(major, minor))


def symlink(target: str) -> Entry:
    return Entry(LINK | 0o777, target.encode())


def archive(members: Mapping[str, Entry]) -> bytes:
    """The archive of ``members`` (paths without a leading ``/``), every missing parent
    directory added, parents before children, owned by root with mtime 0: the same members
    give the same bytes."""
    full = dict(members)
    for name in members:
        parent = Path(name).parent
        while str(parent) != ".":
            full.setdefault(str(parent), directory())
            parent = parent.parent
    out = bytearray()
    for ino, name in enumerate([*sorted(full), "TRAILER!!!"], start=1):   # "a" sorts before "a/b"
        e = full.get(name, Entry(0))
        fields = (ino, e.mode, 0, 0, 2 if e.mode & DIR == DIR else 1, 0, len(e.data), 0, 0,
                  e.rdev[0], e.rdev[1], len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + e.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def cached(target: Path, build: Callable[[], bytes]) -> Path:
    """``target``, written with ``build()`` first if it does not exist: complete or absent,
    also with several processes or threads building it at once."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = debian.scratch(target)
        tmp.write_bytes(build())
        tmp.rename(target)
    return target
