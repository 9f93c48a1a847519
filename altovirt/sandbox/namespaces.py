"""Namespaces, mounts and the root switch: the kernel calls the jailer is built from.

Python 3.11 has no os.unshare or os.setns, and none of mount, umount2 or
pivot_root: they are called through libc here, raising OSError on failure.
"""

from __future__ import annotations

import ctypes
import os

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
# <asm/unistd_64.h> on x86_64, <asm-generic/unistd.h> on aarch64.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(path: str, nstype: int) -> None:
    """Join the namespace at ``path`` (e.g. /run/netns/NAME, /proc/PID/ns/net)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), None), f"mount {target}")


def bind(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND)


def remount_readonly(target: str) -> None:
    """Make a bind mount read-only (a bind mount takes its flags from a second call)."""
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def make_private() -> None:
    """Stop mount events propagating between this (new) mount namespace and the host's."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def pivot_into(root: str) -> None:
    """Make ``root`` this mount namespace's "/" and drop every other mount from view.

    pivot_root(".", ".") stacks the old root on top of the new one, and the
    lazy unmount then takes it away: no old-root directory is left behind in
    the jail (the way runc does it).
    """
    mount(root, root, None, MS_BIND | MS_REC)           # pivot_root wants a mount point
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_parent_death_signal(signum: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
