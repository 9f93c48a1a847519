"""``altovirt-jailer``: build a jail, enter it as an unprivileged user, and run the VMM there.

The jail of VM ``ID`` is ``<chroot-base-dir>/altovirt/<ID>/root``. With
``--exec-file`` naming ``altovirt-firecracker`` the jailer takes the place of
Firecracker's: the jail is ``<chroot-base-dir>/<exec-file name>/<ID>/root``
(base ``/srv/jailer``), it may exist already with the VM's files linked in,
it gets ``/dev/net`` and ``/run``, and the VMM gets Firecracker's flags with
``--id ID`` first. Into it go
the files named with ``--source`` and the device nodes a VM needs, owned by
``--uid``:``--gid``; the jailer then joins the jail's cgroups and network
namespace, enters new mount, UTS and IPC (optionally PID) namespaces, makes the
jail its root, applies the resource limits, drops every capability not kept,
becomes the user and runs the VMM with the arguments after ``--`` (paths in
them are inside the jail).

The VMM runs in this same process, not by exec: everything it will ever import
is imported before the jail is entered, so the jail holds no interpreter, no
library and no Python package, only the VM's files. The jailer must start as
root; nothing of the jail remains mounted on the host, and ``--clean`` removes
what is left on disk (the jail directory and the cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import resource
import shutil
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from .errors import EXIT_ERROR, AltoVirtError, UsageError, exit_now, print_error
from .sandbox import caps, namespaces
from .sandbox.cgroups import CgroupError, JailCgroups

PROG = "altovirt-jailer"
EXEC_NAME = "altovirt"
FIRECRACKER_BASE = "/srv/jailer"                     # Firecracker's jailer's default --chroot-base-dir
# Directories a Firecracker-style jail gets, owned by the VMM's user (as Firecracker's jailer
# makes them): /run holds the default API socket.
FIRECRACKER_DIRS = ("dev", "dev/net", "run")
ID_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")        # Firecracker's rule; also a valid hostname
# (path, needed): the only device nodes a jail gets, when the host has them.
DEVICE_NODES = ("/dev/kvm", "/dev/net/tun", "/dev/urandom", "/dev/null", "/dev/vhost-net",
                "/dev/vhost-vsock")
RLIMIT_ALIASES = {"no-file": "nofile"}               # Firecracker's spelling


class JailError(AltoVirtError):
    """Why the jail could not be built or cleaned; one line for the user."""


class UsageParser(argparse.ArgumentParser):
    """An argparse parser whose errors are a UsageError (one line), not its usage and an exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class Options:
    jail_id: str
    base: str
    clean: bool = False
    uid: int = -1
    gid: int = -1
    sources: list[str] = field(default_factory=list)
    netns: str | None = None
    cgroups: JailCgroups | None = None
    rlimits: list[tuple[int, int]] = field(default_factory=list)
    keep_caps: set[int] = field(default_factory=set)
    daemonize: bool = False
    new_pid_ns: bool = False
    vmm_args: list[str] = field(default_factory=list)
    # --exec-file: the VMM's file name (the jail is <base>/<name>/<id>), and whether it is
    # altovirt-firecracker (Firecracker's flags; the jail may exist already, its files linked
    # in by the tool beforehand, as Firecracker's jailer allows).
    exec_name: str = EXEC_NAME
    firecracker: bool = False

    @property
    def jail_dir(self) -> str:
        return os.path.join(self.base, self.exec_name, self.jail_id)

    @property
    def root(self) -> str:
        return os.path.join(self.jail_dir, "root")

    @property
    def pidfile(self) -> str:
        """Outside the root, so that the jailed VMM cannot rewrite it."""
        return os.path.join(self.jail_dir, f"{EXEC_NAME}.pid")


def _key_value(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise UsageError(f"{option}: expected KEY=VALUE, got {text!r}")
    return key, value


def _rlimit(text: str) -> tuple[int, int]:
    name, value = _key_value("--resource-limit", text)
    attr = "RLIMIT_" + RLIMIT_ALIASES.get(name, name).upper()
    if not attr.isidentifier() or not hasattr(resource, attr):
        known = sorted(n[7:].lower() for n in dir(resource) if n.startswith("RLIMIT_"))
        raise UsageError(f"--resource-limit: unknown limit {name!r}; accepted: {', '.join(known)}")
    if not value.isdigit():
        raise UsageError(f"--resource-limit {name}: {value!r} is not a non-negative integer")
    return getattr(resource, attr), int(value)


def _user_id(option: str, text: str) -> int:
    if not text.isdigit() or int(text) >= 2**32 - 1:
        raise UsageError(f"{option}: {text!r} is not a numeric id (0 to 4294967294)")
    return int(text)


def parse(argv: Sequence[str]) -> Options:
    """The jailer's arguments, checked; UsageError names the first thing wrong."""
    argv = list(argv)
    vmm_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, vmm_args = argv[:cut], argv[cut + 1:]
    p = UsageParser(prog=PROG, add_help=True,
                description="Run the AltoVirt VMM in a jail as an unprivileged user.",
                epilog="Arguments after -- go to the VMM; paths in them are inside the jail.")
    p.add_argument("--id", required=True, help="the jail's name: letters, digits and '-', at most 64")
    p.add_argument("--exec-file", metavar="FILE",
                   help="the VMM: altovirt (the default) or altovirt-firecracker (Firecracker's flags), "
                        "as Firecracker's jailer takes the firecracker binary")
    p.add_argument("--uid", help="numeric user id to run the VMM as")
    p.add_argument("--gid", help="numeric group id to run the VMM as")
    p.add_argument("--allow-root", action="store_true", help="consent to uid or gid 0")
    p.add_argument("--chroot-base-dir", metavar="DIR",
                   help="default /srv/altovirt, or /srv/jailer with --exec-file altovirt-firecracker")
    p.add_argument("--parent-cgroup", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--source", action="extend", nargs="+", default=[], metavar="FILE",
                   help="files the VM needs (kernel, initrd, disk images), put in the jail's root")
    p.add_argument("--netns", metavar="PATH", help="network namespace to join, e.g. /var/run/netns/NAME")
    p.add_argument("--cgroup", action="append", default=[], metavar="FILE=VALUE")
    p.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1)
    p.add_argument("--resource-limit", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--capability", action="append", default=[], metavar="CAP",
                   help="a capability to keep (all others are dropped)")
    p.add_argument("--daemonize", action="store_true")
    p.add_argument("--new-pid-ns", action="store_true")
    p.add_argument("--clean", action="store_true", help="remove the jail and its cgroups, then exit")
    a = p.parse_args(argv)
    if not ID_PATTERN.fullmatch(a.id):
        raise UsageError(f"--id: {a.id!r} may hold only letters, digits and '-' (1 to 64 of them)")
    if a.parent_cgroup is not None:
        raise UsageError("--parent-cgroup: not supported; the jail's cgroups are made under the root "
                         "of each hierarchy")
    exec_name, firecracker = _exec_file(a.exec_file) if a.exec_file else (EXEC_NAME, False)
    base = a.chroot_base_dir or (FIRECRACKER_BASE if firecracker else "/srv/altovirt")
    if not os.path.isabs(base):
        raise UsageError(f"--chroot-base-dir: {base!r} is not an absolute path")
    opts = Options(a.id, os.path.normpath(base), clean=a.clean, exec_name=exec_name, firecracker=firecracker)
    if a.clean:
        return opts
    if a.uid is None or a.gid is None:
        raise UsageError("--uid and --gid are required (the user the VMM runs as)")
    opts.uid, opts.gid = _user_id("--uid", a.uid), _user_id("--gid", a.gid)
    if 0 in (opts.uid, opts.gid) and not a.allow_root:
        raise UsageError("--uid/--gid 0 would run the VMM as root; add --allow-root to mean it")
    names = set()
    for src in a.source:
        if not os.path.exists(src):
            raise UsageError(f"--source: {src}: no such file")
        mode = os.stat(src).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(f"--source: {src} is not a regular file or block device")
        name = os.path.basename(src)
        if name in names:
            raise UsageError(f"--source: two files are named {name!r}; the jail holds them side by side")
        names.add(name)
        opts.sources.append(os.path.abspath(src))
    if a.netns is not None and not os.path.exists(a.netns):
        raise UsageError(f"--netns: {a.netns}: no such namespace file")
    opts.netns = a.netns
    try:
        opts.cgroups = JailCgroups(a.id, a.cgroup_version, [_key_value("--cgroup", c) for c in a.cgroup])
    except CgroupError as e:
        raise UsageError(str(e)) from e
    opts.rlimits = [_rlimit(r) for r in a.resource_limit]
    try:
        opts.keep_caps = {caps.parse(c) for c in a.capability}
    except ValueError as e:
        raise UsageError(f"--capability: {e}") from e
    opts.daemonize, opts.new_pid_ns = a.daemonize, a.new_pid_ns
    if firecracker:
        # As Firecracker's jailer does: the VMM learns its id from the jail's.
        opts.vmm_args = vmm_args if "--id" in vmm_args else ["--id", a.id, *vmm_args]
        return opts
    if not vmm_args:
        raise UsageError("no VMM arguments; give them after --, e.g. -- -kernel vmlinux")
    opts.vmm_args = vmm_args
    return opts


def _exec_file(path: str) -> tuple[str, bool]:
    """--exec-file's name (after links, as Firecracker's jailer takes it) and whether it is
    altovirt-firecracker; the VMM runs in this process either way, nothing is copied."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise UsageError(f"--exec-file: {path}: no such file")
    name = os.path.basename(real)
    if "firecracker" in name:
        return name, True
    if name == EXEC_NAME:
        return name, False
    raise UsageError(f"--exec-file: {path} is not an AltoVirt VMM; give altovirt or altovirt-firecracker "
                     "(or a link to either)")


def import_everything() -> None:
    """Import every module the VMM may need, while the host's files are still in view."""
    import altovirt

    from .devices.legacy import boottimer
    from .sandbox import seccomp

    for mod in pkgutil.walk_packages(altovirt.__path__, "altovirt."):
        if not mod.name.endswith(".__main__"):          # that one runs the VMM
            importlib.import_module(mod.name)
    for name in seccomp.LAZY_MODULES:
        importlib.import_module(name)
    seccomp.prepare()                           # the filters' cache, or their compiler
    boottimer.process_start_monotonic()         # cached: /proc is not in the jail


def _check_unused(opts: Options) -> None:
    """JailError if the VMM of the pidfile still runs in the jail."""
    if os.path.isdir(opts.root):
        with contextlib.suppress(OSError, ValueError):
            with open(opts.pidfile) as f:
                pid = int(f.read())
            root = os.stat(opts.root)
            theirs = os.stat(f"/proc/{pid}/root")
            if (theirs.st_dev, theirs.st_ino) == (root.st_dev, root.st_ino):
                raise JailError(f"jail {opts.jail_id} is in use by process {pid}; stop it first")


def clean(opts: Options) -> None:
    """Remove jail ``opts.jail_id``: its directory and its cgroups (v1 and v2)."""
    _check_unused(opts)
    try:
        JailCgroups(opts.jail_id, 1, []).remove()
    except CgroupError as e:
        raise JailError(str(e)) from e
    if os.path.lexists(opts.jail_dir):
        # The sources are hard links or empty placeholders (bind mounts exist only
        # inside the jail's mount namespace): removing them leaves the originals alone.
        shutil.rmtree(opts.jail_dir)
    with contextlib.suppress(OSError):          # other jails still use it
        os.rmdir(os.path.dirname(opts.jail_dir))


def _build_root(opts: Options) -> list[str]:
    """Create the jail's root with its files and device nodes; returns the sources that
    need a bind mount (the ones that could not be hard-linked)."""
    os.makedirs(os.path.dirname(opts.jail_dir), 0o755, exist_ok=True)
    try:
        os.mkdir(opts.jail_dir, 0o755)
        os.mkdir(opts.root, 0o750)
    except FileExistsError as e:
        if not opts.firecracker:
            raise JailError(f"jail {opts.jail_id} already exists at {opts.jail_dir}; "
                            f"remove it with: altovirt-jailer --id {opts.jail_id} --clean") from e
        os.makedirs(opts.root, 0o750, exist_ok=True)    # a tool linked the VM's files in first
    os.chown(opts.root, opts.uid, opts.gid)      # the VMM creates its sockets and logs here
    if opts.firecracker:
        for d in FIRECRACKER_DIRS:
            os.makedirs(os.path.join(opts.root, d), 0o700, exist_ok=True)
            os.chown(os.path.join(opts.root, d), opts.uid, opts.gid)
    to_bind = []
    for src in opts.sources:
        target = os.path.join(opts.root, os.path.basename(src))
        try:
            os.link(src, target)
        except OSError:                           # another filesystem, or links refused
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            to_bind.append(src)
    for node in DEVICE_NODES:
        try:
            st = os.stat(node)
        except FileNotFoundError:
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        target = opts.root + node
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        try:
            os.mknod(target, stat.S_IFCHR | 0o600, st.st_rdev)
        except FileExistsError:
            there = os.lstat(target)        # a jail used again: the same node is fine, nothing else
            if not (opts.firecracker and stat.S_ISCHR(there.st_mode) and there.st_rdev == st.st_rdev):
                raise JailError(f"{target} exists and is not {node}") from None
        os.chown(target, opts.uid, opts.gid)
    return to_bind


def _writable_sources(vmm_args: list[str]) -> set[str]:
    """The jail's files the VM writes: its drives without readonly=on. Read inside the
    jail as the VMM will read them; arguments the VMM will refuse anyway give none."""
    from .config import HelpRequested
    from .config.cmdline import parse as parse_vm
    from .config.model import ConfigError
    try:
        cfg = parse_vm(vmm_args)
    except (ConfigError, HelpRequested, OSError):
        return set()
    return {os.path.realpath(d.path) for d in cfg.drives if not d.read_only}


def _wait_for(child: int) -> int:
    """Stay in the foreground for ``child`` (the VMM, PID 1 of its namespace): pass
    termination signals on and exit as it does."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def enter(opts: Options) -> int:
    """Build the jail and run the VMM in it; returns the exit status for this process."""
    from .vmm.daemon import write_pidfile

    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.environ.clear()
    import_everything()
    if opts.firecracker:                # a jail used again: its last VMM must be gone
        _check_unused(opts)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(opts.pidfile)
    to_bind = _build_root(opts)
    for limit, value in opts.rlimits:
        resource.setrlimit(limit, (value, value))
    if opts.netns:
        namespaces.setns(opts.netns, namespaces.CLONE_NEWNET)
    if opts.new_pid_ns:
        namespaces.unshare(namespaces.CLONE_NEWPID)     # for the children: the VMM is forked
    if opts.new_pid_ns or opts.daemonize:
        child = os.fork()
        if child:
            write_pidfile(opts.pidfile, child)
            return 0 if opts.daemonize else _wait_for(child)
        if opts.daemonize:
            os.setsid()
    else:
        write_pidfile(opts.pidfile, os.getpid())
    assert opts.cgroups is not None
    opts.cgroups.apply(os.getpid())                     # the VMM's, not a waiting parent's
    # Only after the fork: pivot_root moves every process of the mount namespace.
    namespaces.unshare(namespaces.CLONE_NEWNS | namespaces.CLONE_NEWUTS | namespaces.CLONE_NEWIPC)
    namespaces.make_private()
    binds = {os.path.basename(src): src for src in to_bind}
    for name, src in binds.items():
        namespaces.bind(src, os.path.join(opts.root, name))
    namespaces.sethostname(opts.jail_id)
    namespaces.pivot_into(opts.root)
    writable = set() if opts.firecracker else _writable_sources(opts.vmm_args)
    for name in binds:
        if os.path.realpath("/" + name) not in writable:
            namespaces.remount_readonly("/" + name)
    if opts.daemonize:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    caps.drop_bounding_set(opts.keep_caps)
    namespaces.set_no_new_privs()
    caps.switch_user(opts.uid, opts.gid, opts.keep_caps)
    if opts.new_pid_ns and not opts.daemonize:
        # In the foreground the VMM lives no longer than the jailer the user started:
        # SIGTERM, its clean stop (disks flushed), if that one is killed. (Set after the
        # switch of user, which clears it.)
        namespaces.set_parent_death_signal(signal.SIGTERM)
    if opts.firecracker:
        from . import firecracker
        return firecracker.main(opts.vmm_args)
    from . import cli
    return cli.main(opts.vmm_args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
    except UsageError as e:
        print_error(PROG, str(e))
        return e.exit_status
    except SystemExit as e:                     # --help
        return int(e.code or 0)
    if os.geteuid() != 0:
        print_error(PROG, "must be started as root (it builds the jail, then drops to --uid/--gid)")
        return EXIT_ERROR
    try:
        if opts.clean:
            clean(opts)
            return 0
        return enter(opts)
    except (JailError, CgroupError) as e:
        print_error(PROG, str(e))
        return e.exit_status
    except OSError as e:
        print_error(PROG, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    return EXIT_ERROR


def run() -> NoReturn:
    """The console-script entry point (see errors.exit_now)."""
    exit_now(main())


if __name__ == "__main__":          # python -m altovirt.jailer, where no console script runs
    run()
