"""The snapshot files: ``state`` (a header and one checked section per component) and
``memory`` (guest RAM, sparse): ``DIR/state`` and ``DIR/memory``, or two paths of the
caller's (Firecracker's ``snapshot_path`` and ``mem_file_path``).

``state``::

    "AVSNAP\\r\\n"  format version (u32)  header length (u32)  header (JSON)  header CRC-32 (u32)
    section*: name length (u16)  name  version (u32)  payload length (u64)  CRC-32 (u32)  payload
    end: name length 0

The header carries the snapshot's id, the AltoVirt version and what the caller adds
(RAM size, vCPUs, host CPU). Each section's payload is the component's own
versioned bytes (see :mod:`altovirt.persist`); the CRC covers the section's name,
version and payload. ``memory`` is guest RAM as a flat image, zero pages left as
holes, followed by a trailer with the same id, so that a memory file from another
snapshot is never taken for this one's.

Both files are written to temporary names, flushed to disk, and renamed into place,
memory first: a snapshot is whole once its ``state`` is in place. A crash in
between leaves the old state with the new memory, which the id in the trailer
refuses: a half-written snapshot is never taken for a good one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import AltoVirtError

MAGIC = b"AVSNAP\r\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")            # magic, format version, header length
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_SECTION = struct.Struct("<IQI")            # version, payload length, CRC-32
_TRAILER = struct.Struct("<8s16s")          # magic, snapshot id
MAX_HEADER = 1 << 20
MAX_NAME = 255
PAGE = 4096
_CHUNK = 2 << 20                            # zero runs are looked for this much at a time
_ZERO_PAGE, _ZERO_CHUNK = bytes(PAGE), bytes(_CHUNK)


class SnapshotError(AltoVirtError):
    """A snapshot that cannot be written or read; the message names the file or section."""


@dataclass(frozen=True)
class Section:
    name: str
    version: int
    payload: bytes


@dataclass(frozen=True)
class SnapshotFiles:
    state: str
    memory: str


def files(where: SnapshotFiles | str) -> SnapshotFiles:
    """``where``'s two files: given as such, or a snapshot directory's."""
    if isinstance(where, SnapshotFiles):
        return where
    return SnapshotFiles(os.path.join(where, "state"), os.path.join(where, "memory"))


def _crc(name: bytes, version: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_U32.pack(version), zlib.crc32(name)))


def write(where: SnapshotFiles | str, header: dict[str, Any], sections: list[Section], memory: memoryview,
          progress: Callable[[int], None] | None = None, untouched: bytes | None = None) -> str:
    """Write a snapshot of ``memory`` and ``sections`` to ``where`` (directories are made if
    missing); returns its id. ``header`` holds the caller's plain JSON values. ``progress(done)``
    hears how many bytes of memory are written, as it goes; what it raises abandons the snapshot
    (nothing of it is left). ``untouched``: a byte per page, 1 for pages known to be zero
    without reading them (GuestMemory.untouched_pages)."""
    snapshot_id = uuid.uuid4()
    paths = files(where)
    for directory in {os.path.dirname(paths.state), os.path.dirname(paths.memory)} - {""}:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"{directory}: {e.strerror}") from e
    _replace(paths.memory, lambda fd: _write_memory(fd, memory, snapshot_id, progress, untouched))
    data = encode_state({**header, "id": str(snapshot_id), "memory_size": len(memory)}, sections)
    _replace(paths.state, lambda fd: _write_all(fd, data))
    return str(snapshot_id)


def encode_state(header: dict[str, Any], sections: list[Section]) -> bytes:
    """The state as bytes: the magic, ``header`` (with the AltoVirt version added) and
    ``sections``, as ``state`` holds them and live migration sends them."""
    head = json.dumps({**header, "altovirt": __version__}).encode()
    out = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, _U32.pack(zlib.crc32(head))]
    for s in sections:
        name = s.name.encode()
        if not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"section name {s.name!r}")
        out += [_U16.pack(len(name)), name, _SECTION.pack(s.version, len(s.payload),
                                                          _crc(name, s.version, s.payload)), s.payload]
    out.append(_U16.pack(0))
    return b"".join(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_memory(fd: int, memory: memoryview, snapshot_id: uuid.UUID,
                  progress: Callable[[int], None] | None, untouched: bytes | None) -> None:
    size = len(memory)
    os.ftruncate(fd, size)                  # holes where RAM is zero
    for start in range(0, size, _CHUNK):
        if progress is not None:
            progress(start)
        if untouched is not None and untouched.count(0, start // PAGE, (start + _CHUNK) // PAGE) == 0:
            continue                        # never touched: zero, and not worth reading
        chunk = bytes(memory[start:start + _CHUNK])     # bytes compare as memcmp; views do not
        if chunk == _ZERO_CHUNK[:len(chunk)]:
            continue
        for off in range(0, len(chunk), PAGE):
            page = chunk[off:off + PAGE]
            if page != _ZERO_PAGE[:len(page)]:
                os.pwrite(fd, page, start + off)
    os.pwrite(fd, _TRAILER.pack(MAGIC, snapshot_id.bytes), size)


def _replace(path: str, fill: Callable[[int], None]) -> None:
    """Write ``path`` atomically: a temporary file, fsync, rename, fsync of the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SnapshotError(f"{path}: {e.strerror}") from e
        raise


def read_state(where: SnapshotFiles | str) -> tuple[dict[str, Any], dict[str, Section]]:
    """The header and sections of the snapshot at ``where``, every CRC checked, and its memory
    file checked to be this snapshot's; SnapshotError naming what is wrong otherwise."""
    paths = files(where)
    path = paths.state
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from e
    header, sections = decode_state(data, path)
    if not isinstance(header.get("memory_size"), int) or not isinstance(header.get("id"), str):
        raise SnapshotError(f"{path}: the header is incomplete")
    _check_memory(paths.memory, header)
    return header, sections


def decode_state(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, Section]]:
    """:func:`encode_state`'s header and sections, every CRC checked; SnapshotError naming
    ``where`` (the file, or the migration stream) and what is wrong otherwise."""
    if len(data) < _PREFIX.size or data[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{where}: not an AltoVirt snapshot")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{where}: snapshot format {version}; this AltoVirt reads {FORMAT_VERSION}")
    if head_len > MAX_HEADER:
        raise SnapshotError(f"{where}: the header is corrupt ({head_len} bytes long)")
    at = _PREFIX.size
    head = _take(data, at, head_len, where, "the header")
    at += head_len
    if _U32.unpack(_take(data, at, 4, where, "the header"))[0] != zlib.crc32(head):
        raise SnapshotError(f"{where}: the header is corrupt (CRC mismatch)")
    at += 4
    try:
        header = json.loads(head)
    except ValueError as e:
        raise SnapshotError(f"{where}: the header is corrupt ({e})") from e
    if not isinstance(header, dict):
        raise SnapshotError(f"{where}: the header is incomplete")
    sections: dict[str, Section] = {}
    while True:
        (n,) = _U16.unpack(_take(data, at, 2, where, "the section list"))
        at += 2
        if n == 0:
            break
        raw = _take(data, at, n, where, "a section name")
        name = raw.decode(errors="replace")
        at += n
        s_version, length, crc = _SECTION.unpack(_take(data, at, _SECTION.size, where, f"section {name}"))
        at += _SECTION.size
        payload = _take(data, at, length, where, f"section {name}")
        at += length
        if crc != _crc(raw, s_version, payload):
            raise SnapshotError(f"{where}: section {name} is corrupt (CRC mismatch)")
        if name in sections:
            raise SnapshotError(f"{where}: section {name} appears twice")
        sections[name] = Section(name, s_version, payload)
    if at != len(data):
        raise SnapshotError(f"{where}: {len(data) - at} bytes after the last section")
    return header, sections


def _take(data: bytes, at: int, n: int, path: str, what: str) -> bytes:
    if at + n > len(data):
        raise SnapshotError(f"{path}: truncated in {what}")
    return data[at:at + n]


def _check_memory(path: str, header: dict[str, Any]) -> None:
    size = header["memory_size"]
    try:
        with open(path, "rb") as f:
            f.seek(size)
            trailer = f.read(_TRAILER.size + 1)
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from e
    if len(trailer) != _TRAILER.size:
        raise SnapshotError(f"{path}: not {size} bytes of guest RAM and a trailer")
    magic, raw_id = _TRAILER.unpack(trailer)
    if magic != MAGIC or str(uuid.UUID(bytes=raw_id)) != header["id"]:
        raise SnapshotError(f"{path}: belongs to another snapshot")


def open_memory(where: SnapshotFiles | str) -> int:
    """A read-only descriptor of the snapshot's memory file (checked by :func:`read_state`),
    for mapping guest RAM from it."""
    path = files(where).memory
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from e


def read_memory(where: SnapshotFiles | str, header: dict[str, Any], into: memoryview) -> None:
    """Fill guest RAM, which must be zero, from the snapshot's memory file: only its data is
    read (SEEK_DATA/SEEK_HOLE), its holes are the zero pages."""
    path = files(where).memory
    size = header["memory_size"]
    if len(into) != size:
        raise SnapshotError(f"{path}: {size} bytes of RAM saved; this VM has {len(into)}")
    try:
        with open(path, "rb", buffering=0) as f:
            fd, at = f.fileno(), 0
            while at < size:
                try:
                    data = os.lseek(fd, at, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:       # nothing but holes from here
                        break
                    raise
                end = min(os.lseek(fd, data, os.SEEK_HOLE), size)
                for start in range(data, end, _CHUNK):
                    view = into[start:min(start + _CHUNK, end)]
                    if os.preadv(fd, [view], start) != len(view):
                        raise SnapshotError(f"{path}: truncated at byte {start}")
                at = end
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from e
