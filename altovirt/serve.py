"""``altovirt serve``: a warm parent that forks one VMM per request.

A VMM's start is mostly Python's: the interpreter and the imports come before the guest's
first instruction. The warm parent pays them once: it imports every module a VM may use and
compiles the seccomp filters, then listens on a Unix socket; each request (see
:mod:`.launch`, which also holds the protocol) forks a child that takes the caller's
descriptors, directory, environment, umask and cgroups and runs the program as the command
line would have. The parent reaps the children and tells each caller how its VMM ended.

Who may ask: the socket is the owner's alone (mode 0600), or its group's with
``--allow-group``; and every request's sender (SO_PEERCRED) must be root, the parent's own
user, or one ``--allow-uid`` names. Its VMM runs as that sender (user, group, supplementary
groups), never with more than it has. A malformed request, or one from someone else, gets one
line back and changes nothing; a caller that goes away mid-request costs the parent nothing,
and one that goes away while its VMM runs sends that VMM SIGTERM.

The parent has one thread (a fork copies only the caller's); SIGTERM or SIGINT stop it from
taking requests, and it leaves once every VMM it started has ended, so that each caller
learns its status.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import grp
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import altovirt

from . import launch
from .errors import EXIT_USAGE, UsageError, print_error
from .jailer import UsageParser, import_everything

PROG = "altovirt serve"
BACKLOG = 64
# struct ucred (<sys/socket.h>): pid, uid, gid.
_UCRED = struct.Struct("3i")
_FORWARDED = {getattr(signal, name) for name in launch.FORWARDED}     # the signals a caller passes on
# A cgroup v1 mount's super options that are not the names of its controllers (cgroup-v1.rst).
_NOT_CONTROLLERS = {"rw", "ro", "xattr", "clone_children", "noprefix", "cpuset_v2_mode", "favordynmods"}
Hierarchy = frozenset[str]              # its controllers, as /proc/PID/cgroup names them (v2: none)


@dataclass
class Client:
    """One caller's connection, and the VMM it asked for once forked."""

    sock: socket.socket
    pid: int = 0                        # 0: no VMM yet
    uid: int = -1                       # the caller's credentials (SO_PEERCRED)
    gid: int = -1
    peer_pid: int = 0


@dataclass
class Server:
    listener: socket.socket
    allowed_uids: frozenset[int]
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    clients: dict[int, Client] = field(default_factory=dict)    # by socket descriptor
    by_pid: dict[int, Client] = field(default_factory=dict)
    stopping: bool = False
    wake: tuple[int, int] = (-1, -1)    # the signals' wake-up pipe


def warm() -> None:
    """Import every module a VM may use (the jailer's list) and compile the seccomp filters."""
    import_everything()
    # What is imported now stays out of the collector's passes, which would otherwise touch
    # (and so copy, in each child) every page of it.
    gc.freeze()


def listen(path: str, group: int | None) -> socket.socket:
    """The listening socket at ``path`` (a stale one, which nobody answers, is replaced);
    OSError if it cannot be made."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            raise OSError(errno.EADDRINUSE, "a warm parent already listens there")
        except ConnectionRefusedError:
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)               # the socket is never, even for a moment, open to others
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def serve(server: Server) -> None:
    """Take requests until SIGTERM or SIGINT, then wait for the VMMs still running."""
    server.wake = wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)      # the wake-up byte says which
    sel = server.selector
    sel.register(server.listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    while not (server.stopping and not server.by_pid):
        for key, _ in sel.select():
            try:
                if key.data == "accept":
                    _accept(server)
                elif key.data == "signal":
                    _signals(server, os.read(wake_r, 64))
                else:
                    _readable(server, key.data)
            except Exception as e:      # a bug: the VMMs running and their callers come first
                print_error(PROG, f"internal error: {e}")
    signal.set_wakeup_fd(-1)
    for fd in (wake_r, wake_w):
        os.close(fd)


def _accept(server: Server) -> None:
    try:
        sock, _ = server.listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    client = Client(sock, uid=uid, gid=gid, peer_pid=pid)
    server.clients[sock.fileno()] = client
    server.selector.register(sock, selectors.EVENT_READ, client)


def _readable(server: Server, client: Client) -> None:
    try:
        message, fds = launch.receive(client.sock, launch.STDIO)
    except (OSError, ValueError) as e:
        message, fds = {"bad": str(e)}, []
    if message is None:                 # the caller went away
        if client.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(client.pid, signal.SIGTERM)
        _drop(server, client)
        return
    if client.pid:
        signum = message.get("signal")
        if isinstance(signum, int) and signum in _FORWARDED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(client.pid, signum)
        return
    try:
        if client.uid not in (0, os.geteuid()) and client.uid not in server.allowed_uids:
            raise ValueError(f"user {client.uid} may not start VMs here")
        _fork(server, client, _check(message, fds, server.stopping), fds)
    except (ValueError, OSError) as e:
        for fd in fds:
            os.close(fd)
        _refuse(client, str(e) if isinstance(e, ValueError) else f"cannot fork a VMM: {e.strerror}")
        _drop(server, client)


def _check(message: dict[str, Any], fds: list[int], stopping: bool) -> dict[str, Any]:
    """The request, checked; ValueError saying what is wrong with it."""
    if stopping:
        raise ValueError("the warm parent is stopping")
    if "bad" in message:
        raise ValueError(f"malformed request: {message['bad']}")
    if len(fds) != launch.STDIO:
        raise ValueError(f"a request carries {launch.STDIO} descriptors (stdin, stdout, stderr), "
                         f"not {len(fds)}")
    if message.get("prog") not in launch.PROGRAMS:
        raise ValueError(f"prog must be one of {', '.join(launch.PROGRAMS)}")
    argv, env = message.get("argv"), message.get("env")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a list of strings")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError("env must map strings to strings")
    if not isinstance(message.get("cwd"), str) or not isinstance(message.get("umask"), int):
        raise ValueError("cwd must be a string and umask an integer")
    return message


def _refuse(client: Client, why: str) -> None:
    with contextlib.suppress(OSError):
        launch.send(client.sock, {"error": why})


def _drop(server: Server, client: Client) -> None:
    fd = client.sock.fileno()
    if server.clients.pop(fd, None) is not None:
        server.selector.unregister(client.sock)
    if not client.pid:
        client.sock.close()
    # A client whose VMM runs keeps its place in by_pid: the status is reaped, not sent.


def _fork(server: Server, client: Client, request: dict[str, Any], fds: list[int]) -> None:
    """Fork the caller's VMM (the descriptors are closed here once it has them); ValueError or
    OSError, with nothing forked, if it cannot be."""
    if threading.active_count() != 1:   # a fork copies only this thread: nothing else may hold a lock
        raise ValueError(f"the warm parent runs {threading.active_count()} threads: it cannot fork safely")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(server, client, request, fds)
    for fd in fds:
        os.close(fd)
    fds.clear()
    client.pid = pid
    server.by_pid[pid] = client
    with contextlib.suppress(OSError):
        launch.send(client.sock, {"pid": pid})


def _signals(server: Server, received: bytes) -> None:
    if (signal.SIGTERM in received or signal.SIGINT in received) and not server.stopping:
        server.stopping = True
        server.selector.unregister(server.listener)
        server.listener.close()
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        client = server.by_pid.pop(pid, None)
        if client is None:
            continue
        ended = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) \
            else {"exit": os.waitstatus_to_exitcode(status)}
        with contextlib.suppress(OSError):
            launch.send(client.sock, ended)
        fd = client.sock.fileno()
        if server.clients.pop(fd, None) is not None:
            server.selector.unregister(client.sock)
        client.sock.close()


# --- the child ---

def _child(server: Server, client: Client, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """Become the caller's VMM: its descriptors, place and cgroups, then its program."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server.selector.close()
        for other in server.clients.values():
            other.sock.close()
        server.listener.close()
        for fd in server.wake:
            os.close(fd)
        os.setsid()                     # out of the parent's process group and session
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        _reopen_stdio()
        _join_cgroups(client.peer_pid)
        _become(client)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        altovirt.IMPORT_STARTED = time.perf_counter()  # the start-up budget counts from the fork
        prog, argv = request["prog"], request["argv"]
        sys.argv = [prog, *argv]
        status = _PROGRAMS[prog](argv)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        print_error(request.get("prog", PROG), f"cannot start in the warm parent: {e}")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _become(client: Client) -> None:
    """Take the caller's user, group and supplementary groups (from /proc, read while the
    caller waits for its answer), where they are not this process's: its VMM may do what a
    VMM it started itself could, and no more."""
    if client.uid == os.geteuid() and client.gid == os.getegid():
        return
    groups: list[int] = []
    with open(f"/proc/{client.peer_pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                groups = [int(g) for g in line.split()[1:]]
    os.setgroups(groups)
    os.setgid(client.gid)
    os.setuid(client.uid)


def _reopen_stdio() -> None:
    """Python's standard streams over the new descriptors, buffered as they would have been
    had the program started on them (line by line on a terminal)."""
    # The process's own streams, open until it ends.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115


def _join_cgroups(pid: int) -> None:
    """Move this process into the cgroups of process ``pid`` (the caller), in each hierarchy
    where they differ from ours; OSError if one cannot be joined."""
    mine = _cgroups("self")
    moves = {h: path for h, path in _cgroups(str(pid)).items() if mine.get(h) != path}
    mounts = _cgroup_mounts() if moves else {}     # a caller in the parent's cgroups: nothing to read
    for hierarchy, path in moves.items():
        mount = mounts.get(hierarchy)
        if mount is None:
            name = ",".join(sorted(hierarchy)) or "v2"
            raise OSError(errno.ENOENT, f"no mount of the cgroup hierarchy {name}")
        where = os.path.join(mount, path.lstrip("/"), "cgroup.procs")
        with open(where, "w") as f:
            f.write(str(os.getpid()))


def _cgroups(pid: str) -> dict[Hierarchy, str]:
    """/proc/PID/cgroup: each hierarchy's cgroup."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[frozenset(controllers.split(",")) - {""}] = path
    return out


def _cgroup_mounts() -> dict[Hierarchy, str]:
    """Where each hierarchy's root is mounted (mountinfo, proc(5))."""
    out: dict[Hierarchy, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            root, point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
            if root != "/" or fstype not in ("cgroup", "cgroup2"):
                continue
            names = frozenset() if fstype == "cgroup2" else frozenset(
                o for o in options.split(",")
                if o not in _NOT_CONTROLLERS and not o.startswith("release_agent="))
            out.setdefault(names, point)
    return out


def _altovirt(argv: list[str]) -> int:
    from . import cli
    return cli.main(argv)


def _firecracker(argv: list[str]) -> int:
    from . import firecracker
    return firecracker.main(argv)


def _jailer(argv: list[str]) -> int:
    from . import jailer
    return jailer.main(argv)


_PROGRAMS = {"altovirt": _altovirt, "altovirt-firecracker": _firecracker, "altovirt-jailer": _jailer}
assert set(_PROGRAMS) == set(launch.PROGRAMS)


# --- the command ---

def parse(argv: list[str]) -> argparse.Namespace:
    ap = UsageParser(prog=PROG, description="A warm parent that forks one VMM per request; "
                                 f"point {launch.ENV} at its socket to start VMs through it.")
    ap.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on")
    ap.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                    help="a user, besides root and this process's, who may start VMs here")
    ap.add_argument("--allow-group", metavar="GROUP",
                    help="a group whose members may connect (the socket becomes mode 0660)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        opts = parse(argv)
    except UsageError as e:
        print_error(PROG, str(e))
        return e.exit_status
    except SystemExit as e:             # --help, printed
        return int(e.code or 0)
    group = None
    if opts.allow_group is not None:
        try:
            group = int(opts.allow_group) if opts.allow_group.isdigit() \
                else grp.getgrnam(opts.allow_group).gr_gid
        except KeyError:
            print_error(PROG, f"--allow-group: no group {opts.allow_group!r}")
            return EXIT_USAGE
    try:
        listener = listen(opts.socket, group)
    except OSError as e:
        print_error(PROG, f"--socket {opts.socket}: {e.strerror or e}")
        return 1
    warm()                              # callers meanwhile wait in the listen queue
    server = Server(listener, frozenset(opts.allow_uid))
    try:
        serve(server)
    finally:
        with contextlib.suppress(OSError):
            if not server.stopping:
                listener.close()
            os.unlink(opts.socket)
    return 0
