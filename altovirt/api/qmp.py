"""A QMP server on a unix socket (QEMU's docs/interop/qmp-spec.rst).

Each client gets the greeting, must negotiate with ``qmp_capabilities`` and
may then run commands; requests are a JSON stream (several objects in one
read, or one object split over reads, both work), every reply and event is
one line, and ``id`` is echoed whatever JSON value it is. Events go to every
negotiated client. The server runs on its own thread; a malformed request
gets an error reply, an oversized one closes that client, and nothing a
client sends can stop the VM or the other clients.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..backends.unix import Peer, SocketServer
from ..config.keys import KeyProblem, Problem, Types, find_key_problem
from ..errors import AltoVirtError

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20           # bytes a client may have pending without completing a request
MAX_OUTPUT = 16 << 20           # replies and events a client has not read; past this it is dropped
MAX_FDS = 8                     # file descriptors taken from one read (SCM_RIGHTS)


class QmpError(AltoVirtError):
    """A command failed; ``cls`` is QEMU's error class."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


@dataclass
class Command:
    """A command: its handler and its arguments as name -> (type, required).

    A command that ``takes_fd`` is called as ``handler(args, fd)`` with the
    oldest file descriptor the client sent (SCM_RIGHTS) and not yet used; the
    fd is the handler's once it returns, and stays the client's if it raises.
    """

    handler: Callable[..., object]
    params: dict[str, tuple[type | tuple[type, ...], bool]] = field(default_factory=dict)
    takes_fd: bool = False


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass(eq=False)
class Client(Peer):
    inbuf: str = ""
    # One decoder for the whole stream: a character split across two reads is one character.
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8_decoder)
    negotiated: bool = False
    fds: list[int] = field(default_factory=list)     # received, not yet taken by a command
    # Where the scan for the end of the current request stands (see _split).
    scan: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False


def _split(client: Client) -> str | None:
    """The next complete JSON value in the client's input, or None while it is incomplete.

    Like QEMU's json-streamer, it only tracks nesting outside strings to find
    where a request ends; the text is parsed (and rejected) as a whole after.
    """
    text = client.inbuf
    i = client.scan
    if client.depth == 0 and not client.in_string:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        client.inbuf = text = text[i:]
        i = 0
        if not text:
            return None
        if text[0] not in "{[":             # a bare scalar or garbage: up to the next separator
            end = next((k for k, ch in enumerate(text) if ch in " \t\r\n{["), len(text))
            if end == len(text):
                return None
            client.inbuf, client.scan = text[end:], 0
            return text[:end]
    while i < len(text):
        ch = text[i]
        i += 1
        if client.in_string:
            if client.escaped:
                client.escaped = False
            elif ch == "\\":
                client.escaped = True
            elif ch == '"':
                client.in_string = False
        elif ch == '"':
            client.in_string = True
        elif ch in "{[":
            client.depth += 1
        elif ch in "}]":
            client.depth -= 1
            if client.depth == 0:
                client.inbuf, client.scan = text[i:], 0
                return text[:i]
    client.scan = i
    return None


_TYPE_NAMES = {str: "string", int: "int", bool: "bool", dict: "object", list: "array"}


def argument_error(problem: KeyProblem, prefix: str = "") -> QmpError:
    """QEMU's words for a bad argument (its QAPI input visitor's), which QMP clients match;
    ``prefix`` places a nested object's key (``file.``)."""
    key = prefix + problem.key
    if problem.kind is Problem.UNKNOWN:
        return QmpError("GenericError", f"Parameter '{key}' is unexpected")
    if problem.kind is Problem.MISSING:
        return QmpError("GenericError", f"Parameter '{key}' is missing")
    expected = "/".join(_TYPE_NAMES.get(k, k.__name__) for k in problem.expected)
    return QmpError("GenericError", f"Invalid parameter type for '{key}', expected: {expected}")


def check_arguments(params: Mapping[str, tuple[Types, bool]], args: Mapping[str, object],
                    prefix: str = "") -> None:
    """QmpError (:func:`argument_error`) for the first bad key of ``args``, in
    :func:`~altovirt.config.keys.find_key_problem`'s order; ``params`` as :class:`Command`'s."""
    required = {key: types for key, (types, needed) in params.items() if needed}
    optional = {key: types for key, (types, needed) in params.items() if not needed}
    problem = find_key_problem(args, required, optional)
    if problem is not None:
        raise argument_error(problem, prefix)


def _check_args(cmd: Command, args: object) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
    check_arguments(cmd.params, args)
    return args


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class QmpServer(SocketServer[Client]):
    def __init__(self, path: str, commands: dict[str, Command], version: dict[str, Any],
                 on_start: Callable[[], None] | None = None,
                 named_fds: dict[str, int] | None = None) -> None:
        """``on_start`` runs first on the server's thread (the VMM confines it there).
        ``named_fds``: the descriptors clients named with getfd (the commands' table keeps
        them there), which, as QEMU's monitor's, outlive a connection and go with the server."""
        super().__init__(path, "qmp", max_output=MAX_OUTPUT, on_start=on_start)
        self.commands = commands
        self.version = version
        self.named_fds = {} if named_fds is None else named_fds

    # --- events (any thread) ---
    def event(self, name: str, data: dict[str, object]) -> None:
        line = _encode({"event": name, "data": data, "timestamp": timestamp()})
        for client in self.peers:
            if client.negotiated:
                self.send(client, line)

    # --- connections (the QMP thread) ---
    def accepted(self, sock: socket.socket) -> Client:
        client = Client(sock)
        self.send(client, _encode({"QMP": {"version": self.version, "capabilities": []}}))
        return client

    def dropped(self, client: Client) -> None:
        _close_fds(client)

    def read(self, client: Client) -> bytes | None:
        try:
            data, fds, _, _ = socket.recv_fds(client.sock, 65536, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        if fds:
            # As QEMU's socket chardev does: new fds replace those no command took.
            _close_fds(client)
            client.fds = fds
        return data

    def received(self, client: Client, data: bytes) -> bool:
        client.inbuf += client.decoder.decode(data)
        if len(client.inbuf) > MAX_REQUEST:
            too_big = QmpError("GenericError", f"request larger than {MAX_REQUEST} bytes")
            self._reply(client, None, error=too_big)
            self.flush(client)
            return False
        self._process(client)
        return True

    def close(self, flush_timeout: float = 1.0) -> None:
        """Stop serving; clients get up to ``flush_timeout`` to take what is queued (SHUTDOWN).
        The named descriptors no command took are closed."""
        super().close(flush_timeout)
        for fd in self.named_fds.values():
            os.close(fd)
        self.named_fds.clear()

    def _process(self, client: Client) -> None:
        """Take every complete request off the client's input."""
        while (text := _split(client)) is not None:
            try:
                msg = json.loads(text)
            except json.JSONDecodeError as e:
                self._reply(client, None, error=QmpError("GenericError", f"JSON parse error, {e.msg}"))
                continue
            self._dispatch(client, msg)

    def _dispatch(self, client: Client, msg: object) -> None:
        if not isinstance(msg, dict):
            self._reply(client, None, error=QmpError("GenericError", "QMP input must be a JSON object"))
            return
        has_id, req_id = "id" in msg, msg.get("id")
        name = msg.get("execute")
        try:
            for key in msg:
                if key not in ("execute", "arguments", "id"):
                    raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
            if not isinstance(name, str):
                raise QmpError("GenericError", "QMP input lacks member 'execute'")
            if not client.negotiated and name != "qmp_capabilities":
                raise QmpError("CommandNotFound",
                               "Expecting capabilities negotiation with 'qmp_capabilities'")
            if client.negotiated and name == "qmp_capabilities":
                raise QmpError("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")
            cmd = self.commands.get(name)
            if cmd is None:
                raise QmpError("CommandNotFound", f"The command {name} has not been found")
            args = _check_args(cmd, msg.get("arguments", {}))
            if cmd.takes_fd:
                if not client.fds:
                    raise QmpError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
                result = cmd.handler(args, client.fds[0])
                client.fds.pop(0)
            else:
                result = cmd.handler(args)
        except QmpError as e:
            self._reply(client, req_id if has_id else None, error=e, has_id=has_id)
            return
        except Exception as e:      # a bug in a command: report it, keep serving
            log.exception("QMP command %s failed", name)
            failure = QmpError("GenericError", f"internal error: {e}")
            self._reply(client, req_id, error=failure, has_id=has_id)
            return
        self._reply(client, req_id, result=result if result is not None else {}, has_id=has_id)
        if name == "qmp_capabilities":
            # Events (sent from other threads) only once the reply has gone: a client such as
            # qemu.qmp takes anything else in its place for a failed negotiation.
            client.negotiated = True

    def _reply(self, client: Client, req_id: object, *, result: object = None,
               error: QmpError | None = None, has_id: bool = False) -> None:
        msg: dict[str, object] = ({"error": {"class": error.cls, "desc": error.desc}} if error
                                  else {"return": result})
        if has_id:
            msg["id"] = req_id
        self.send(client, _encode(msg))


def _close_fds(client: Client) -> None:
    for fd in client.fds:
        os.close(fd)
    client.fds.clear()


def _encode(msg: object) -> bytes:
    return (json.dumps(msg, separators=(", ", ": ")) + "\r\n").encode()
