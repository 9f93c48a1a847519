"""QMP commands on the VM's XenStore, as dom0: for orchestrators that speak only QMP.

Values are bytes in the store; on QMP they travel as text, ``format``
``utf8`` (the default) or ``base64``, as QEMU's ``ringbuf-read`` and
``ringbuf-write`` carry them. Permissions are Xen's strings (``n0``,
``r7``...), the first naming the owner. A refusal is a GenericError naming
the path and the XenStore errno; the store is unchanged. Every write made here
fires watches on the host socket and the guest's connections alike.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..xenstore.store import DOM0, Store
from ..xenstore.tree import Perm, XsError
from ..xenstore.wire import PAYLOAD_MAX
from .qmp import Command, QmpError

FORMATS = ("utf8", "base64")
T = TypeVar("T")


def _encode(value: bytes, fmt: str) -> str:
    if fmt == "base64":
        return base64.b64encode(value).decode()
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise QmpError("GenericError", "the value is not UTF-8; read it with format 'base64'") from e


def _decode(value: str, fmt: str) -> bytes:
    if fmt == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise QmpError("GenericError", "Parameter 'value' is not valid base64") from e
    return value.encode()


def _format(args: dict[str, Any]) -> str:
    fmt = args.get("format", "utf8")
    if fmt not in FORMATS:
        raise QmpError("GenericError", f"Parameter 'format' expects one of {', '.join(FORMATS)}")
    return str(fmt)


def _perms(texts: list[Any]) -> tuple[Perm, ...]:
    """Xen's permission strings, the owner's first."""
    if texts and all(isinstance(t, str) for t in texts):
        with contextlib.suppress(XsError):
            return tuple(Perm.parse(t) for t in texts)
    raise QmpError("GenericError", "Parameter 'perms' expects a non-empty list like [\"n0\", \"r7\"]: "
                                   "n (none), r, w or b (both), then a domain id")


def xenstore_commands(store: Store) -> dict[str, Command]:
    """xenstore-read/-write/-list/-rm/-get-perms/-set-perms."""
    session = store.session(DOM0, lambda path, token: None)      # QMP has no watches

    def call(path: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except XsError as e:
            reason = os.strerror(getattr(errno, e.name))         # every XsError name is an errno's
            raise QmpError("GenericError", f"{path}: {e.name} ({reason})") from e

    def read(args: dict[str, Any]) -> object:
        path, fmt = args["path"], _format(args)
        return {"value": _encode(call(path, lambda: session.read(0, path)), fmt)}

    def write(args: dict[str, Any]) -> object:
        path = args["path"]
        value = _decode(args["value"], _format(args))
        if len(path.encode()) + 1 + len(value) > PAYLOAD_MAX:     # what the wire could never read back
            raise QmpError("GenericError", f"{path}: the path and value are over {PAYLOAD_MAX} bytes")
        call(path, lambda: session.write(0, path, value))
        return {}

    def list_(args: dict[str, Any]) -> object:
        path = args["path"]
        return call(path, lambda: session.directory(0, path)[1])

    def rm(args: dict[str, Any]) -> object:
        path = args["path"]
        call(path, lambda: session.rm(0, path))
        return {}

    def get_perms(args: dict[str, Any]) -> object:
        path = args["path"]
        return [str(p) for p in call(path, lambda: session.get_perms(0, path))]

    def set_perms(args: dict[str, Any]) -> object:
        path, perms = args["path"], _perms(args["perms"])
        call(path, lambda: session.set_perms(0, path, perms))
        return {}

    path_only: dict[str, tuple[type | tuple[type, ...], bool]] = {"path": (str, True)}
    return {
        "xenstore-read": Command(read, {**path_only, "format": (str, False)}),
        "xenstore-write": Command(write, {**path_only, "value": (str, True), "format": (str, False)}),
        "xenstore-list": Command(list_, path_only),
        "xenstore-rm": Command(rm, path_only),
        "xenstore-get-perms": Command(get_perms, path_only),
        "xenstore-set-perms": Command(set_perms, {**path_only, "perms": (list, True)}),
    }
