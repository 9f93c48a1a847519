"""The front end of the vhost-user protocol: a device's virtqueues served by another process.

The back end (QEMU's virtiofsd, for virtio-fs) listens on a unix socket; AltoVirt
connects, and hands it what vhost hands the kernel: guest RAM (the memfd of
``mem-share=on``, by descriptor, with each region's guest and userspace address),
each queue's rings, its kick (the ioeventfd KVM signals) and its call (the irqfd).
Requests and their numbers follow QEMU's docs/interop/vhost-user.rst ("front-end
message types"); every message is a 12-byte header and a payload, descriptors ride
along as SCM_RIGHTS. A back end that answers with something else, or goes away,
raises :class:`VhostUserError`; the device it serves then stops (NEEDS_RESET).
"""

from __future__ import annotations

import errno
import socket
import struct

from . import BackendError

# Front-end message types (vhost-user.rst)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
SET_VRING_ENABLE = 18
VERSION = 0x1                   # header flags: the protocol version...
REPLY = 0x4                     # ...and "this is a reply"
F_PROTOCOL_FEATURES = 30        # VHOST_USER_F_PROTOCOL_FEATURES: rings start disabled
MAX_REGIONS = 8                 # VHOST_MEMORY_BASELINE_NREGIONS
TIMEOUT = 10.0                  # seconds a back end may take to answer

_HEADER = struct.Struct("<III")         # request, flags, size
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")           # struct vhost_vring_state: index, num
_ADDR = struct.Struct("<IIQQQQ")        # index, flags, descriptor, used, available, log
_MEMORY = struct.Struct("<II")          # nregions, padding
_REGION = struct.Struct("<QQQQ")        # guest address, size, userspace address, mmap offset


class VhostUserError(BackendError):
    """The back end refused, answered wrongly or went away; the message says which."""


class VhostUser:
    """A connection to one vhost-user back end, owned by this VMM (SET_OWNER).

    Not thread-safe: the device serializes its calls (its transport's lock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(path)
            self._send(SET_OWNER)
            self.features = self._get_u64(GET_FEATURES)
            if self.features >> F_PROTOCOL_FEATURES & 1:
                self._get_u64(GET_PROTOCOL_FEATURES)
                self._send(SET_PROTOCOL_FEATURES, _U64.pack(0))     # none of the extensions
        except VhostUserError:
            self.sock.close()
            raise
        except OSError as e:                # connect()
            self.sock.close()
            raise VhostUserError(e.errno, f"vhost-user back end {path}: {e.strerror or e}") from e

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def set_features(self, features: int) -> None:
        """The features the driver accepted (PROTOCOL_FEATURES kept when the back end has it)."""
        self._send(SET_FEATURES, _U64.pack(features | self.features & 1 << F_PROTOCOL_FEATURES))

    def set_mem_table(self, regions: list[tuple[int, int, int, int]], fd: int | None) -> None:
        """Guest RAM as (guest address, size, userspace address, offset in ``fd``) regions; the
        back end maps them from ``fd``, which RAM must be (None: it is private to this process)."""
        if fd is None:
            raise VhostUserError(0, "guest RAM is not shared (-machine mem-share=on)")
        if len(regions) > MAX_REGIONS:
            raise VhostUserError(0, f"{len(regions)} memory regions; vhost-user takes {MAX_REGIONS}")
        payload = _MEMORY.pack(len(regions), 0) + b"".join(_REGION.pack(*r) for r in regions)
        self._send(SET_MEM_TABLE, payload, [fd] * len(regions))

    def start_vring(self, index: int, size: int, next_avail: int, rings: tuple[int, int, int],
                    kick: int, call: int) -> None:
        """Serve queue ``index`` from ``next_avail`` on; ``rings``: this process's addresses of
        its descriptor table, available and used rings (the back end maps them through the
        memory table)."""
        desc, avail, used = rings
        self._send(SET_VRING_NUM, _STATE.pack(index, size))
        self._send(SET_VRING_BASE, _STATE.pack(index, next_avail))
        self._send(SET_VRING_ADDR, _ADDR.pack(index, 0, desc, used, avail, 0))
        self._send(SET_VRING_KICK, _U64.pack(index), [kick])
        self._send(SET_VRING_CALL, _U64.pack(index), [call])
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self._send(SET_VRING_ENABLE, _STATE.pack(index, 1))

    def stop_vring(self, index: int) -> int:
        """Stop serving queue ``index``; returns where it stood in the available ring."""
        reply = self._call(GET_VRING_BASE, _STATE.pack(index, 0), _STATE.size)
        got, num = _STATE.unpack(reply)
        if got != index:
            raise VhostUserError(0, f"vhost-user back end {self.path}: GET_VRING_BASE answered "
                                    f"for queue {got}, not {index}")
        return int(num)

    def close(self) -> None:
        self.sock.close()

    # --- messages ---
    def _send(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        data = _HEADER.pack(request, VERSION, len(payload)) + payload
        try:
            if fds:
                rights = struct.pack(f"{len(fds)}i", *fds)
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise self._error(e) from e

    def _get_u64(self, request: int) -> int:
        return int(_U64.unpack(self._call(request, b"", _U64.size))[0])

    def _call(self, request: int, payload: bytes, size: int) -> bytes:
        """Send ``request`` and read its reply: the same request, the reply flag, ``size`` bytes."""
        self._send(request, payload)
        header = self._read(_HEADER.size)
        got, flags, length = _HEADER.unpack(header)
        if got != request or flags & 0x3 != VERSION or not flags & REPLY or length != size:
            raise VhostUserError(0, f"vhost-user back end {self.path}: a bad reply to request {request} "
                                    f"(request {got}, flags {flags:#x}, {length} bytes)")
        return self._read(size)

    def _read(self, n: int) -> bytes:
        data = b""
        try:
            while len(data) < n:
                chunk = self.sock.recv(n - len(data))
                if not chunk:
                    raise VhostUserError(0, f"vhost-user back end {self.path}: closed the connection")
                data += chunk
        except TimeoutError as e:
            raise VhostUserError(0, f"vhost-user back end {self.path}: no answer in {TIMEOUT:.0f} s") from e
        except VhostUserError:
            raise
        except OSError as e:
            raise self._error(e) from e
        return data

    def _error(self, e: OSError) -> VhostUserError:
        gone = e.errno in (errno.EPIPE, errno.ECONNRESET)
        return VhostUserError(e.errno, f"vhost-user back end {self.path}: "
                                       f"{'closed the connection' if gone else e.strerror or e}")
