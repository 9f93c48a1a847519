"""Running ``altovirt-firecracker`` for tests, and a client of its API socket (the standard
library's http.client, over a unix socket)."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from pathlib import Path

from .conftest import Vm

FIRECRACKER = [sys.executable, "-m", "altovirt.firecracker"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class Api:
    """A client of the Firecracker API at ``sock``, which exists."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.conn = UnixHTTPConnection(str(sock))

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """The status and the decoded JSON body (None if empty) of one request."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: object = None) -> object:
        status, reply = self.call(method, path, body)
        assert status in (200, 204), f"{method} {path}: {status} {reply}"
        return reply

    def fault(self, method: str, path: str, body: object = None) -> str:
        """The fault_message of a request that must fail with 400."""
        status, reply = self.call(method, path, body)
        assert status == 400, f"{method} {path}: {status} {reply}"
        assert isinstance(reply, dict) and set(reply) == {"fault_message"}, reply
        message = reply["fault_message"]
        assert isinstance(message, str) and message and "Traceback" not in message
        return message

    def state(self) -> str:
        info = self.ok("GET", "/")
        assert isinstance(info, dict)
        return str(info["state"])

    def close(self) -> None:
        self.conn.close()


class Firecracker(Api):
    """An ``altovirt-firecracker --api-sock SOCK ...`` process, its stdout (the serial
    console) and stdin, and its API."""

    def __init__(self, vms: list[Vm], sock: Path, *args: str, prefix: tuple[str, ...] = (),
                 launcher: list[str] = FIRECRACKER) -> None:
        self.vm = Vm("--api-sock", str(sock), *args, prefix=prefix, launcher=launcher)
        vms.append(self.vm)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.vm.proc.poll() is None, f"the VMM exited: {self.vm.finish()[1]}"
            assert time.monotonic() < deadline, "the API socket never appeared"
            time.sleep(0.01)
        super().__init__(sock)

    @classmethod
    def attach(cls, vm: Vm, sock: Path) -> Firecracker:
        """The API of a VMM started otherwise (by the jailer, say), whose socket exists."""
        fc = cls.__new__(cls)
        fc.vm = vm
        Api.__init__(fc, sock)
        return fc
