"""The XenStore wire protocol (xen/include/public/io/xs_wire.h), transport aside.

A :class:`Connection` takes the bytes a client sends and answers through a
``send`` callback: a 16-byte ``xsd_sockmsg`` header (type, req_id, tx_id,
len; native byte order) and ``len`` payload bytes. Replies echo the request's
type and ids; failures are ERROR replies carrying an errno name; watch events
are unsolicited WATCH_EVENT messages. A request whose payload is over 4096
bytes is fatal for its connection, as in xenstored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum

from .store import Session, Store, Watch, domain_path
from .tree import Perm, XsError

HEADER = struct.Struct("=IIII")             # struct xsd_sockmsg
PAYLOAD_MAX = 4096                          # XENSTORE_PAYLOAD_MAX
# xs_wire.h's xsd_errors: the names a reply may carry; any other is sent as EINVAL.
ERRNO_NAMES = frozenset({"EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
                         "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG"})


class Op(IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


OK = b"OK\0"


def _strings(payload: bytes, count: int) -> list[str]:
    """Exactly ``count`` NUL-terminated strings (EINVAL otherwise), as xenstored reads them.
    Latin-1 keeps every byte of a token; paths are checked to be ASCII later."""
    parts = payload.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise XsError("EINVAL")
    return [p.decode("latin-1") for p in parts[:-1]]


def _names(names: list[str]) -> bytes:
    return b"".join(n.encode() + b"\0" for n in names)


class Connection:
    """One client of ``store`` as domain ``domid``; ``send(message)`` must only queue."""

    def __init__(self, store: Store, domid: int, send: Callable[[bytes], None]) -> None:
        self.session: Session = store.session(domid, self._event)
        self.send = send
        self._inbuf = bytearray()
        self._held: list[bytes] | None = None       # events raised while a request runs

    def feed(self, data: bytes) -> bool:
        """Handle every complete request in ``data``; False when the connection must close."""
        self._inbuf += data
        while len(self._inbuf) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(self._inbuf)
            if length > PAYLOAD_MAX:
                return False
            end = HEADER.size + length
            if len(self._inbuf) < end:
                break
            payload = bytes(self._inbuf[HEADER.size:end])
            del self._inbuf[:end]
            self.request(op, req_id, tx_id, payload)
        return True

    def close(self) -> None:
        self.session.close()

    def request(self, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        """Answer one request; the events it causes follow its reply."""
        self._held = []
        watch: Watch | None = None
        try:
            result = self._dispatch(op, tx_id, payload)
            if isinstance(result, Watch):
                watch, result = result, OK
            self._message(op, req_id, tx_id, result)
        except XsError as e:
            name = e.name if e.name in ERRNO_NAMES else "EINVAL"
            self._message(Op.ERROR, req_id, tx_id, name.encode() + b"\0")
        held, self._held = self._held, None
        for event in held:
            self.send(event)
        if watch is not None:
            self.session.fire_initial(watch)       # after the OK, as xenstored does

    def _message(self, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if len(payload) > PAYLOAD_MAX:
            op, payload = Op.ERROR, b"E2BIG\0"
        self.send(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)

    def _event(self, path: str, token: str) -> None:
        payload = path.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"
        message = HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload
        if self._held is not None:
            self._held.append(message)
        else:
            self.send(message)

    def _dispatch(self, op: int, tx: int, payload: bytes) -> bytes | Watch:
        s = self.session
        if op == Op.READ:
            return s.read(tx, *_strings(payload, 1))
        if op == Op.WRITE:
            path, sep, value = payload.partition(b"\0")
            if not sep:
                raise XsError("EINVAL")
            s.write(tx, path.decode("latin-1"), value)
            return OK
        if op == Op.DIRECTORY:
            return _names(s.directory(tx, *_strings(payload, 1))[1])
        if op == Op.DIRECTORY_PART:
            return self._directory_part(tx, *_strings(payload, 2))
        if op == Op.GET_PERMS:
            return _names([str(p) for p in s.get_perms(tx, *_strings(payload, 1))])
        if op == Op.MKDIR:
            s.mkdir(tx, *_strings(payload, 1))
            return OK
        if op == Op.RM:
            s.rm(tx, *_strings(payload, 1))
            return OK
        if op == Op.SET_PERMS:
            parts = payload.split(b"\0")
            if len(parts) < 3 or parts[-1] != b"":
                raise XsError("EINVAL")
            perms = tuple(Perm.parse(p.decode("latin-1")) for p in parts[1:-1])
            s.set_perms(tx, parts[0].decode("latin-1"), perms)
            return OK
        if op == Op.WATCH:
            return s.watch(*_strings(payload, 2))
        if op == Op.UNWATCH:
            s.unwatch(*_strings(payload, 2))
            return OK
        if op == Op.RESET_WATCHES:
            s.reset()
            return OK
        if op == Op.TRANSACTION_START:
            return f"{s.transaction_start()}\0".encode()
        if op == Op.TRANSACTION_END:
            flag = payload.rstrip(b"\0")
            if flag not in (b"T", b"F"):
                raise XsError("EINVAL")
            s.transaction_end(tx, flag == b"T")
            return OK
        if op == Op.GET_DOMAIN_PATH:
            return domain_path(self._domid(payload)).encode() + b"\0"
        if op == Op.IS_DOMAIN_INTRODUCED:
            return b"T\0" if self._domid(payload) in (0, s.store.guest_domid) else b"F\0"
        # CONTROL, INTRODUCE, RELEASE, RESUME, SET_TARGET need a hypervisor; the rest are
        # not requests.
        raise XsError("ENOSYS")

    @staticmethod
    def _domid(payload: bytes) -> int:
        (text,) = _strings(payload, 1)
        if not text.isdigit() or int(text) >= 1 << 16:
            raise XsError("EINVAL")
        return int(text)

    def _directory_part(self, tx: int, path: str, offset: str) -> bytes:
        """``gencnt\\0`` then the whole child names that fit, from byte ``offset`` of the
        full NUL-separated list; the last part ends with an empty name (a second NUL),
        which is how libxenstore knows it has them all."""
        if not offset.isdigit():
            raise XsError("EINVAL")
        gen, names = self.session.directory(tx, path)
        head = f"{gen}\0".encode()
        listing = _names(names)[int(offset):]
        room = PAYLOAD_MAX - len(head) - 1
        if len(listing) <= room:
            return head + listing + b"\0"
        return head + listing[:listing.rindex(b"\0", 0, room) + 1]
