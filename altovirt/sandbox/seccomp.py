"""Seccomp filters for AltoVirt's threads, built with seccompy from :mod:`.allowlists`.

:func:`enable` is called once the VM is built (every module the VMM will use
is imported by then); each long-lived thread then calls :func:`confine` with
its role as it starts. A forbidden call traps: faulthandler writes every
thread's Python stack, the offending one first as "Current thread", to the
log, and the signal's default action ends the process at once (status 159,
128 + SIGSYS). The kernel logs the call's number as well (``dmesg``:
``type=1326 ... syscall=N``).
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import mmap
import signal
import socket
import threading
from typing import TextIO

import seccompy
from seccompy import Action, ArgCmp, CmpOp, Filter, FilterFlag

from ..errors import AltoVirtError
from .allowlists import IOCTLS, ROLES, SOCKET_FAMILIES

PR_SET_NAME = 15
# Imported lazily by the standard library on rare paths (a logged traceback):
# loaded up front, because a confined thread cannot open them any more.
LAZY_MODULES = ("traceback", "linecache", "tokenize")

_libc = ctypes.CDLL(None, use_errno=True)


class SeccompError(AltoVirtError, RuntimeError):
    """Filtering cannot be turned on here; the message is one line for the user."""


_enabled = False
_default_action = Action.TRAP
_programs: dict[str, bytes] = {}         # each role's filter, compiled once
_compiling = threading.Lock()


class sock_fprog(ctypes.Structure):
    """<linux/filter.h>: a classic BPF program (``filter`` points at ``len`` sock_filters)."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


SYS_seccomp = 317                       # x86_64
SECCOMP_SET_MODE_FILTER = 1             # <linux/seccomp.h>
SECCOMP_FILTER_FLAG_LOG = 2
PR_SET_NO_NEW_PRIVS = 38
SOCK_FILTER_SIZE = 8                    # sizeof(struct sock_filter)


def enable(report: TextIO, *, audit_only: bool = False, precompile: bool = False) -> None:
    """Turn filtering on for threads that confine themselves from now on; forbidden
    calls are reported on ``report``. ``audit_only`` logs them (to the kernel log)
    instead of stopping the VMM: for finding what an allow-list misses. ``precompile``:
    compile every role's filter now, not as each role's first thread starts (a process
    that waits for its API to start the VM does it while it waits)."""
    global _enabled, _default_action
    if not seccompy.supported():
        raise SeccompError("this kernel cannot load seccomp filters; run with -disable-seccomp")
    for name in LAZY_MODULES:
        importlib.import_module(name)
    faulthandler.register(signal.SIGSYS, file=report, all_threads=True, chain=True)
    _default_action = Action.LOG if audit_only else Action.TRAP
    if precompile:
        for role in ROLES:
            _program(role)
    _enabled = True


def build(role: str) -> Filter:
    """The filter for ``role`` (see allowlists)."""
    # FLAG_LOG: the kernel records trapped calls (with their numbers) in its log.
    f = Filter(default=_default_action, flags=FilterFlag.LOG)
    no_exec = ArgCmp(2, CmpOp.MASKED_EQ, 0, mask=mmap.PROT_EXEC)
    for name in ROLES[role]:
        if name in ("mmap", "mprotect"):
            f.allow(name, args=[no_exec])             # no new executable memory once running
        elif name == "ioctl":
            for request in IOCTLS[role]:
                # The request is an unsigned int: compare the low 32 bits only.
                f.allow("ioctl", args=[ArgCmp(1, CmpOp.MASKED_EQ, request, mask=0xFFFFFFFF)])
        elif name in ("socket", "socketpair"):
            for family in SOCKET_FAMILIES.get(role, (socket.AF_UNIX,)):
                f.allow(name, args={0: family})
        else:
            f.allow(name)
    return f


def confine(role: str) -> None:
    """Name the calling thread after its Python name (for ps and the kernel log) and,
    when filtering is on, load ``role``'s filter on it."""
    name = threading.current_thread().name.encode()[:15]
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    if _enabled:
        _load(_program(role))


def _program(role: str) -> bytes:
    """``role``'s filter, compiled once (the vCPU role's takes some 3 ms): the threads of a
    role after the first only load it."""
    with _compiling:
        if role not in _programs:
            _programs[role] = build(role).program
        return _programs[role]


def _load(program: bytes) -> None:
    """Install a compiled filter on the calling thread (what seccompy's Filter.load does, for a
    program compiled once and loaded by many threads)."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = sock_fprog(len(program) // SOCK_FILTER_SIZE, ctypes.addressof(buf))
    if _libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG, ctypes.byref(prog)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")
