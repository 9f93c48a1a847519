"""Live migration's stream and the RAM it carries (``vmm/migration.py`` drives it).

The stream, once the source has connected::

    hello   "AVMIGR\\r\\n"  version (u32)  RAM size (u64)
    records "P" offset (u64) pages (u32) and the pages: RAM at that offset
            "Z" offset (u64) pages (u32): pages that are zero now
            "S" length (u64) and the state (snapshot.format.encode_state): the last record
    answer  "K": the destination runs the VM; or "F" length (u32) and why not

What changed between passes is KVM's dirty log of the guest's writes joined with
the pages the VMM wrote itself, which KVM does not see: device buffers, marked
as each chain is used (after the device's write, on whichever thread made it),
and every active queue's used ring.
"""

from __future__ import annotations

import ctypes as C
import re
import socket
import struct
from collections.abc import Callable, Sequence

from ..backends.unix import listen_unix
from ..config.model import MigrationUri
from ..devices.virtio.transport import VirtioTransport
from ..errors import AltoVirtError
from ..kvm import Vm
from ..kvm import ioctls as K
from ..memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory

MAGIC = b"AVMIGR\r\n"
STREAM_VERSION = 1
_HELLO = struct.Struct("<8sIQ")
_PAGES = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_REASON = struct.Struct("<I")
MAX_STATE = 64 << 20                # a state record longer than this is not ours
MAX_RUN = 256                       # pages a "P" record carries at most (1 MiB)
MAX_REASON = 4096
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0                   # a peer silent this long has gone
_ZERO_RUN = bytes(MAX_RUN * PAGE_SIZE)
# A byte of a dirty bitmap, as the 8 page flags (0 or 1) it stands for.
_BITS = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]
_NONZERO = re.compile(rb"[^\x00]+")

# sent(bytes on the wire, bytes of RAM covered, pages sent, zero pages): the sender's accounting
# (which may raise to stop it: a cancel).
Sent = Callable[[int, int, int, int], None]


class MigrationError(AltoVirtError):
    """A migration that cannot start or did not complete; the message says why."""


def _socket(uri: MigrationUri) -> tuple[socket.socket, str | tuple[str, int]]:
    """A socket for ``uri`` and its address. No name lookup (getaddrinfo): the host is an
    IP address (config/validate.py), and the resolver's modules cannot load in the sandbox."""
    if uri.kind == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC), uri.path
    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC), (uri.host, uri.port)


def connect(uri: MigrationUri) -> socket.socket:
    sock, address = _socket(uri)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address)
    except OSError as e:
        sock.close()
        raise MigrationError(f"{uri}: cannot connect: {e.strerror or e}") from e
    sock.settimeout(IO_TIMEOUT)
    return sock


def listen(uri: MigrationUri) -> socket.socket:
    """The destination's listening socket, made at start-up (a usage error if it cannot be)."""
    try:
        if uri.kind == "unix":
            return listen_unix(uri.path, 1)
        sock, address = _socket(uri)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise MigrationError(f"-incoming {uri}: cannot listen: {e.strerror or e}") from e


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        k = sock.recv_into(view)
        if not k:
            # As a reset or a broken pipe says it (migration.py): the peer went either way.
            raise MigrationError("the connection was lost (closed by the peer)")
        view = view[k:]


def _flags(bitmap: bytes, pages: int) -> bytearray:
    """A byte per page, 0 or 1, of KVM's dirty bitmap (bit n of byte k: page 8k + n); only the
    bitmap's nonzero bytes are spread, as the last copy, while the guest waits, does this."""
    flags = bytearray(8 * len(bitmap))
    for run in _NONZERO.finditer(bitmap):
        flags[8 * run.start():8 * run.end()] = b"".join(_BITS[b] for b in run.group())
    del flags[pages:]
    return flags


class DirtyLog:
    """The pages of guest RAM written since the last :meth:`collect`, while started."""

    def __init__(self, vm: Vm, mem: GuestMemory, transports: Sequence[VirtioTransport]) -> None:
        self._vm, self._mem, self._transports = vm, mem, transports

    def _log(self, on: bool) -> None:
        mem = self._mem
        flags = K.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, region in enumerate(mem.regions):
            self._vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region), flags)
        mem.track_writes(on)

    def start(self) -> None:
        self._log(True)

    def stop(self) -> None:
        self._log(False)

    def collect(self, pending: bytearray | None = None) -> bytearray:
        """A flag (0 or 1) per page of RAM: written since the last call, or flagged in
        ``pending`` (collected before, not sent yet)."""
        mem = self._mem
        # The used rings are written in place, with no mark for each element: they go every
        # pass. The last pass comes after the devices are quiescent, so it has their last write.
        for transport in self._transports:
            for q in transport.queues:
                if q.active:
                    mem.mark_written(*q.ring_ranges()[2])
        written = mem.take_written()
        flags = bytearray()
        for slot, region in enumerate(mem.regions):
            pages = region.size >> PAGE_SHIFT
            bitmap = (C.c_uint64 * ((pages + 63) // 64))()
            self._vm.get_dirty_log(slot, bitmap)
            flags += _flags(bytes(bitmap), pages)
        both = int.from_bytes(flags, "little") | int.from_bytes(written, "little")
        if pending is not None:
            both |= int.from_bytes(pending, "little")
        return bytearray(both.to_bytes(len(written), "little"))


class Sender:
    """The source's end of the stream, over ``sock``, of guest RAM ``ram``."""

    def __init__(self, sock: socket.socket, ram: memoryview, sent: Sent) -> None:
        self._sock, self._ram, self._sent = sock, ram, sent

    def hello(self) -> None:
        self._sock.sendall(_HELLO.pack(MAGIC, STREAM_VERSION, len(self._ram)))

    def _run(self, at: int, n: int, throttle: Callable[[], None] | None, *, skip_zero: bool) -> None:
        chunk = self._ram[at << PAGE_SHIFT:(at + n) << PAGE_SHIFT]
        if bytes(chunk) == _ZERO_RUN[:len(chunk)]:      # bytes compare as memcmp; views do not
            if not skip_zero:
                self._sock.sendall(b"Z" + _PAGES.pack(at << PAGE_SHIFT, n))
            self._sent(0 if skip_zero else 1 + _PAGES.size, len(chunk), 0, n)
            return
        self._sock.sendall(b"P" + _PAGES.pack(at << PAGE_SHIFT, n))
        self._sock.sendall(chunk)
        self._sent(1 + _PAGES.size + len(chunk), len(chunk), n, 0)
        if throttle is not None:
            throttle()

    def all_pages(self, throttle: Callable[[], None], untouched: bytes | None) -> None:
        """The first pass: every page that is not zero (the destination's RAM starts zeroed);
        ``untouched`` flags pages known to be zero without reading them."""
        pages = len(self._ram) >> PAGE_SHIFT
        for at in range(0, pages, MAX_RUN):
            n = min(MAX_RUN, pages - at)
            if untouched is not None and untouched.count(0, at, at + n) == 0:
                self._sent(0, n << PAGE_SHIFT, 0, n)
            else:
                self._run(at, n, throttle, skip_zero=True)

    def pages(self, dirty: bytearray, throttle: Callable[[], None] | None) -> None:
        """Every page flagged in ``dirty``, in runs; zero pages as "Z" records."""
        at = dirty.find(1)
        while at >= 0:
            end = dirty.find(0, at, at + MAX_RUN)
            end = min(at + MAX_RUN, len(dirty)) if end < 0 else end
            self._run(at, end - at, throttle, skip_zero=False)
            at = dirty.find(1, end)

    def state(self, data: bytes) -> None:
        """The last record; returns once the destination runs the VM, MigrationError if it
        refused it."""
        self._sock.sendall(b"S" + _LENGTH.pack(len(data)) + data)
        self._sent(1 + _LENGTH.size + len(data), 0, 0, 0)
        answer = _read(self._sock, 1)
        if answer == b"F":
            (n,) = _REASON.unpack(_read(self._sock, _REASON.size))
            why = _read(self._sock, min(n, MAX_REASON)).decode(errors="replace")
            raise MigrationError(f"the destination refused the VM: {why}")
        if answer != b"K":
            raise MigrationError("the destination answered with garbage")


def receive(sock: socket.socket, ram: memoryview, received: Callable[[int], None],
            load: Callable[[bytes], None]) -> None:
    """The destination's end: the hello checked against ``ram``, page records written into
    it (``received(bytes)`` after each), then ``load(state)``, whose exception (any) is
    answered "F" with its message and raised again; "K" once it has returned."""
    magic, version, size = _HELLO.unpack(_read(sock, _HELLO.size))
    if magic != MAGIC:
        raise MigrationError("the peer is not an AltoVirt migration source")
    if version != STREAM_VERSION:
        raise MigrationError(f"stream version {version}; this AltoVirt reads {STREAM_VERSION}")
    if size != len(ram):
        raise MigrationError(f"{size} bytes of RAM sent; this VM has {len(ram)} (-m)")
    while True:
        kind = _read(sock, 1)
        if kind in (b"P", b"Z"):
            off, n = _PAGES.unpack(_read(sock, _PAGES.size))
            if off % PAGE_SIZE or not 0 < n <= MAX_RUN or off + n * PAGE_SIZE > len(ram):
                raise MigrationError(f"a page record out of RAM ({n} pages at {off:#x})")
            target = ram[off:off + n * PAGE_SIZE]
            if kind == b"P":
                _recv_into(sock, target)
            else:
                target[:] = _ZERO_RUN[:len(target)]
            received(len(target))
        elif kind == b"S":
            (n,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
            if n > MAX_STATE:
                raise MigrationError(f"a state record of {n} bytes")
            try:
                load(_read(sock, n))
            except Exception as e:
                reason = str(e).encode()[:MAX_REASON]
                sock.sendall(b"F" + _REASON.pack(len(reason)) + reason)
                raise
            sock.sendall(b"K")
            return
        else:
            raise MigrationError(f"unknown record {kind!r} in the migration stream")
