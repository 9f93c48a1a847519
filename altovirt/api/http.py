"""An HTTP/1.1 server on a unix socket (RFC 9112), for the Firecracker-style REST API.

Requests are read with Content-Length bodies only (no chunked encoding, as
Firecracker's server), answered in order, and connections are kept alive
unless the client says ``Connection: close`` (or speaks HTTP/1.0 without
keep-alive). ``Expect: 100-continue`` is answered so that curl sends large
bodies at once.

Nothing a client does blocks the server: input is buffered per connection on
the server's event loop, a request head past :data:`MAX_HEAD` bytes or a
malformed one gets a 400 and the connection is closed, a body past the
payload limit gets a 413 and the connection is closed, and once
:data:`MAX_CONNECTIONS` clients are connected the one idle longest makes room
for a new one, so slow or silent clients cannot keep others out.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..backends.unix import Peer, SocketServer
from ..errors import AltoVirtError

log = logging.getLogger(__name__)

MAX_HEAD = 8192                 # request line and headers
MAX_CONNECTIONS = 32
MAX_OUTPUT = 1 << 20            # replies a client has not read; past this it is dropped
DEFAULT_MAX_PAYLOAD = 51200     # Firecracker's --http-api-max-payload-size default
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 413: "Payload Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 505: "HTTP Version Not Supported"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str                   # the absolute path, without the query
    headers: dict[str, str]     # names in lower case
    body: bytes | None          # None: the request has no body (or an empty one)


@dataclass(frozen=True)
class Response:
    status: int
    body: object = None         # JSON-encoded if not None


Handler = Callable[[Request], Response]


class HttpError(AltoVirtError):
    """A request the server refuses before the handler sees it; the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def fault(status: int, message: str) -> Response:
    """An error response as Firecracker words them: ``{"fault_message": ...}``."""
    return Response(status, {"fault_message": message})


@dataclass(eq=False)
class Connection(Peer):
    inbuf: bytearray = field(default_factory=bytearray)
    head: tuple[str, str, str, dict[str, str]] | None = None   # parsed, waiting for the body
    length: int = 0
    last_active: float = field(default_factory=time.monotonic)


def encode(response: Response, *, close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
             "Server: AltoVirt API", f"Connection: {'close' if close else 'keep-alive'}"]
    body = b""
    if response.body is not None:
        body = json.dumps(response.body).encode()
        lines.append("Content-Type: application/json")
    if response.body is not None or response.status != 204:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, path, version and headers of a request head (without its final blank line);
    HttpError 400 (or 505 for another HTTP version) if it is malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as e:
        raise HttpError(400, "the request head is not ASCII") from e
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}; expected METHOD PATH HTTP/1.1")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505 if version.startswith("HTTP/") else 400, f"unsupported protocol {version[:20]!r}")
    if not target.startswith("/"):
        raise HttpError(400, f"the request target {target[:80]!r} is not an absolute path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isprintable():
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        key, value = name.lower(), value.strip()
        if key in headers and key == "content-length" and headers[key] != value:
            raise HttpError(400, "two different Content-Length headers")
        headers[key] = f"{headers[key]}, {value}" if key in headers and key != "content-length" else value
    return method, target.split("?", 1)[0], version, headers


class HttpServer(SocketServer[Connection]):
    """Serves ``handler`` on a unix socket at ``path`` (which must not exist), on its own thread."""

    def __init__(self, path: str, handler: Handler, *, name: str = "api",
                 max_payload: int = DEFAULT_MAX_PAYLOAD, on_start: Callable[[], None] | None = None,
                 sock: socket.socket | None = None) -> None:
        """``name``: the server thread's; ``sock``: the socket already listening at ``path``
        (see backends.listen)."""
        super().__init__(path, name, max_output=MAX_OUTPUT, backlog=MAX_CONNECTIONS, on_start=on_start,
                         sock=sock)
        self.handler = handler
        self.max_payload = max_payload

    def accepted(self, sock: socket.socket) -> Connection:
        peers = self.peers
        if len(peers) >= MAX_CONNECTIONS:
            self.drop(min(peers, key=lambda p: p.last_active), "idle longest, a new client came")
        return Connection(sock)

    def received(self, conn: Connection, data: bytes) -> bool:
        conn.inbuf += data
        conn.last_active = time.monotonic()
        try:
            while self._next(conn):
                pass
        except HttpError as e:
            self.send(conn, encode(fault(e.status, e.message), close=True))
            self.flush(conn)
            return False
        return conn.sock.fileno() >= 0

    def _next(self, conn: Connection) -> bool:
        """Handle the next request if it is all there; False when more input is needed
        (or the connection is to close)."""
        if conn.head is None:
            end = conn.inbuf.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(conn.inbuf) > MAX_HEAD):
                raise HttpError(400, f"request head longer than {MAX_HEAD} bytes")
            if end < 0:
                return False
            conn.head = parse_head(bytes(conn.inbuf[:end]))
            del conn.inbuf[:end + 4]
            conn.length = self._length(conn.head[3])
            if conn.length > len(conn.inbuf) and conn.head[3].get("expect", "").lower() == "100-continue":
                self.send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(conn.inbuf) < conn.length:
            return False
        method, path, version, headers = conn.head
        body = bytes(conn.inbuf[:conn.length]) or None
        del conn.inbuf[:conn.length]
        conn.head, conn.length = None, 0
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        self.send(conn, encode(self._call(Request(method, path, headers, body)), close=close))
        if close:
            self.flush(conn)
            self.drop(conn, "Connection: close")
            return False
        return True

    def _length(self, headers: dict[str, str]) -> int:
        if "transfer-encoding" in headers:
            raise HttpError(501, "Transfer-Encoding is not supported; send the body with Content-Length")
        text = headers.get("content-length", "0")
        if not text.isdigit() or len(text) > 19:
            raise HttpError(400, f"Content-Length {text[:40]!r} is not a number of bytes")
        length = int(text)
        if length > self.max_payload:
            raise HttpError(413, f"Request payload with size {length} is larger than the limit of "
                                 f"{self.max_payload} allowed by server.")
        return length

    def _call(self, request: Request) -> Response:
        try:
            return self.handler(request)
        except Exception as e:          # a bug in a handler: report it, keep serving
            log.exception("API request %s %s failed", request.method, request.path)
            return fault(500, f"internal error: {e}")
