"""The console scripts' entry points, kept light: with ``ALTOVIRT_SERVER`` set to the socket
of a warm parent (``altovirt serve``, see :mod:`.serve`), the VMM is forked there, already
imported, instead of starting here; otherwise, or where no warm parent answers, the program
runs in this process as it always did.

Through a warm parent the caller's view stays the same: this process hands over its standard
input, output and error (the descriptors themselves), its arguments, working directory,
environment and umask; it passes on the signals it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
SIGUSR1, SIGUSR2) and exits with the VMM's status, or by the signal that ended it. The VMM
joins this process's cgroups and takes its user. ``altovirt-jailer`` goes the same way: the
jail (chroot, namespaces, cgroups, the unprivileged user) is built in the forked child, as it
is in the jailer's own process, and the VMM runs in it there.

The protocol, on a SOCK_SEQPACKET socket, one JSON object a message:
  client -> parent: {"prog", "argv", "cwd", "env", "umask"} with the three descriptors
                    (SCM_RIGHTS), then {"signal": N} for each signal to pass on;
  parent -> client: {"pid": N} once forked, then {"exit": status} or {"signal": N};
                    or {"error": "one line"} instead, the request refused.
Closing the connection before the VMM ends sends it SIGTERM, as a terminal's hang-up would.
"""

from __future__ import annotations

# Each start pays for what is imported before its request is sent: the C modules under socket
# and json, not those modules, whose enum and re were nine tenths of its imports' time. json is
# imported while the warm parent forks, signal once the VMM runs.
import _socket
import os
import struct
import sys
from _json import encode_basestring_ascii

from .errors import AltoVirtError

TYPE_CHECKING = False               # typing's import would cost each start 3 ms, for annotations
if TYPE_CHECKING:
    from typing import Any, NoReturn

ENV = "ALTOVIRT_SERVER"
MAX_MESSAGE = 1 << 20               # a request's arguments and environment, at most
STDIO = 3                           # the descriptors a request carries: stdin, stdout, stderr
PROGRAMS = ("altovirt", "altovirt-firecracker", "altovirt-jailer")
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")     # the signal module's names


class Unreachable(AltoVirtError):
    """No warm parent answers at the socket (absent, refused, or gone before it forked)."""


def encode(value: object) -> str:
    """``value`` (a dict, list, str or int, nested) in JSON, as ``json.dumps`` writes it."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{encode(k)}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    raise TypeError(f"cannot send a {type(value).__name__}")


def send(sock: _socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(message).encode()
    if fds:
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.send(data)


def receive(sock: _socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors it carried; (None, []) at the end of the
    connection. ValueError if it is not a JSON object, or carried more than ``max_fds``
    descriptors (those are closed)."""
    import json
    space = _socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, space)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4])
    try:
        if flags & (_socket.MSG_CTRUNC | _socket.MSG_TRUNC) or len(fds) > max_fds:
            raise ValueError("message too long, or too many descriptors")
        if not data:
            return None, fds
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message, fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


def through_server(path: str, prog: str, argv: list[str]) -> NoReturn:
    """Run ``prog argv`` in the warm parent at ``path`` and end as it ends; Unreachable if
    no warm parent took the request (the caller may then start the VMM itself)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    umask = os.umask(0)
    os.umask(umask)
    try:
        sock.connect(path)
        send(sock, {"prog": prog, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                    "umask": umask}, [0, 1, 2])
        reply, _ = receive(sock)
    except (OSError, ValueError) as e:
        sock.close()
        raise Unreachable(f"{path}: {getattr(e, 'strerror', None) or e}") from e
    if reply is None or "pid" not in reply:
        error = reply.get("error") if reply else None
        if not error:
            sock.close()
            raise Unreachable(f"{path}: the warm parent closed the connection")
        _end(prog, f"warm parent at {path}: {error}", 1)
    import signal
    for name in FORWARDED:
        # Python runs the handler on this thread, between two waits for the next message.
        signal.signal(getattr(signal, name), lambda n, _frame: send(sock, {"signal": n}))
    while True:
        try:
            message, _ = receive(sock)
        except (OSError, ValueError) as e:
            _end(prog, f"warm parent at {path}: {e}", 1)
        if message is None:
            _end(prog, f"the warm parent at {path} went away; VMM process {reply['pid']} "
                       "may still run", 1)
        if "exit" in message:
            _end(prog, None, int(message["exit"]))
        if "signal" in message:
            number = int(message["signal"])
            sys.stdout.flush()
            if number != signal.SIGKILL:        # which has no handler to undo
                signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            _end(prog, None, 128 + number)


def _end(prog: str, error: str | None, status: int) -> NoReturn:
    if error:
        print(f"{prog}: {error}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _start(prog: str) -> None:
    """Hand the command to the warm parent named by ALTOVIRT_SERVER, if any; returns only
    where there is none to hand it to (after one line saying why, if one was named)."""
    path = os.environ.get(ENV)
    if path:
        try:
            through_server(path, prog, sys.argv[1:])
        except Unreachable as e:
            print(f"{prog}: warning: no warm parent: {e}; starting here", file=sys.stderr)


def run() -> NoReturn:
    """``altovirt``: ``altovirt serve ...`` runs a warm parent; anything else, a VM."""
    if sys.argv[1:2] == ["serve"]:
        from .serve import main as serve_main
        _end("altovirt", None, serve_main(sys.argv[2:]))
    _start("altovirt")
    from .cli import run as cli_run
    cli_run()


def run_firecracker() -> NoReturn:
    """``altovirt-firecracker``."""
    _start("altovirt-firecracker")
    from .firecracker import run as firecracker_run
    firecracker_run()


def run_jailer() -> NoReturn:
    """``altovirt-jailer``."""
    _start("altovirt-jailer")
    from .jailer import run as jailer_run
    jailer_run()
