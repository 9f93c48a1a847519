"""The guest's side of MMDS: one HTTP request head in, its response out, as Firecracker answers
(``src/vmm/src/mmds/mod.rs``; micro_http's parsing).

GET reads the store: V1 with or without a token, V2 only with a valid one in
``X-metadata-token`` (or EC2's ``X-aws-ec2-metadata-token``); ``Accept: application/json``
asks for JSON, anything else for the IMDS form. ``PUT /latest/api/token`` with
``X-metadata-token-ttl-seconds`` (or EC2's header) makes a token; a PUT that names
``X-Forwarded-For`` is refused, as a request that came through a proxy.
"""

from __future__ import annotations

from .store import Mmds, NotFound, StoreError, Unsupported
from .token import TokenError

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
TTL_HEADERS = ("x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 501: "Not Implemented"}


class Reply:
    """A response: its status, body and Content-Type, and headers more."""

    def __init__(self, status: int, body: str, json: bool = False, headers: tuple[str, ...] = ()) -> None:
        self.status, self.body, self.json, self.headers = status, body, json, headers

    def encode(self, version: str = "HTTP/1.1") -> bytes:
        body = self.body.encode()
        kind = "application/json" if self.json else "text/plain"
        head = [f"{version} {self.status} {_REASONS[self.status]}", "Server: Firecracker API",
                "Connection: keep-alive", f"Content-Type: {kind}", *self.headers,
                f"Content-Length: {len(body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def respond(mmds: Mmds, head: bytes) -> bytes:
    """The response to one request head (through its blank line), as bytes to send."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return Reply(400, "Invalid request.").encode()
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return Reply(400, "Invalid request.").encode()
    method, uri, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return Reply(501, "Unsupported HTTP version.").encode()
    if method not in ("GET", "PUT", "PATCH"):
        return Reply(501, "Unsupported HTTP method.").encode(version)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            return Reply(400, f"Invalid header. Key: {name}, Value: {value.strip()}").encode(version)
        headers[name.lower()] = value.strip()
    if "content-length" in headers and headers["content-length"] != "0":
        return Reply(400, "Invalid request.").encode(version)       # no MMDS request has a body
    path = uri.split("?", 1)[0]
    if path.startswith("http://"):                                  # an absolute form
        path = "/" + path[len("http://"):].partition("/")[2]
    if not path:
        return Reply(400, "Invalid URI.").encode(version)
    return _answer(mmds, method, path, headers).encode(version)


def _answer(mmds: Mmds, method: str, path: str, headers: dict[str, str]) -> Reply:
    while "//" in path:
        path = path.replace("//", "/")
    if method == "GET":
        token = next((headers[h] for h in TOKEN_HEADERS if h in headers), None)
        if mmds.version == "V2":
            if token is None:
                return Reply(401, "No MMDS token provided. Use `X-metadata-token` or "
                                  "`X-aws-ec2-metadata-token` header to specify the session token.")
            if not mmds.tokens.is_valid(token):
                return Reply(401, "MMDS token not valid.")
        as_json = "application/json" in headers.get("accept", "")
        try:
            return Reply(200, mmds.get(path, as_json), json=as_json and not mmds.imds_compat)
        except NotFound:
            return Reply(404, f"Resource not found: {path}.")
        except Unsupported as e:
            return Reply(501, str(e))
        except StoreError as e:
            return Reply(413, str(e))
    if method == "PATCH":
        return Reply(405, "Not allowed HTTP method.", headers=("Allow: GET, PUT",))
    if "x-forwarded-for" in headers:
        return Reply(400, "Unsupported header name. Key: X-Forwarded-For")
    if path != TOKEN_PATH:
        return Reply(404, f"Resource not found: {path}.")
    name = next((h for h in TTL_HEADERS if h in headers), None)
    if name is None:
        return Reply(400, "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
                          "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.")
    value = headers[name]
    if not value.isdigit() or int(value) >= 1 << 32:
        return Reply(400, f"Invalid value. Key:{name}; Value:{value}")
    try:
        token = mmds.tokens.generate(int(value))
    except TokenError as e:
        return Reply(400, str(e))
    return Reply(200, token, headers=(f"{name}: {value}",))
