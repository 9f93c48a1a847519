"""Seccomp filters for AltoVirt's threads: :mod:`.allowlists` compiled with seccompy.

:func:`enable` is called once the VM is built (every module the VMM will use
is imported by then); each long-lived thread then calls :func:`confine` with
its role as it starts. A forbidden call traps: faulthandler writes the
offending thread's Python stack to the log, and the signal's default action
ends the process at once (status 159, 128 + SIGSYS). Only that thread's: the
call was made with the GIL let go (every system call is), so the other threads
run on while the handler works, and walking their frames then could crash the
VMM instead (a suite run saw it end with SIGSEGV). The kernel logs the call's number as well (``dmesg``:
``type=1326 ... syscall=N``).

The compiled programs are kept in the package's ``__pycache__``, as Python keeps
bytecode there, so that a VMM starts without importing seccompy at all (as
Firecracker compiles its filters when it is built). The file holds the rules it
was compiled from and the stamps of the compiler (seccompy and this module): a
file that does not match all of them, or that is damaged, is compiled again.
``python -m altovirt.sandbox.seccomp`` writes it at install time.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import importlib
import importlib.machinery
import marshal
import mmap
import os
import signal
import socket
import sys
import threading
import zlib
from typing import TYPE_CHECKING, TextIO

from ..errors import AltoVirtError
from .allowlists import IOCTLS, ROLES, SOCKET_FAMILIES, native_name

if TYPE_CHECKING:
    from seccompy import Filter

PR_SET_NAME = 15
PR_GET_NAME = 16
# Imported lazily on rare paths, loaded up front because a confined thread cannot open them
# any more, nor map an extension module's code: the standard library's for a logged
# traceback; on arm64 the device tree's writer and a gzip'd kernel's inflater, which a VM
# that came from a snapshot first needs at its first reset.
LAZY_MODULES = ("traceback", "linecache", "tokenize",
                *(("libfdt", "zlib") if os.uname().machine == "aarch64" else ()))

_libc = ctypes.CDLL(None, use_errno=True)

# A rule: a system call and the conditions on its arguments, all of which must hold:
# (argument index, seccompy CmpOp name, value, mask).
Condition = tuple[int, str, int, int]
Rule = tuple[str, tuple[Condition, ...]]
# What compiled programs depend on (see _cache_key).
CacheKey = tuple[int, str, str, tuple[tuple[int, int], ...], tuple[tuple[str, tuple[Rule, ...]], ...]]
U64 = (1 << 64) - 1
DEFAULT_ACTIONS = ("TRAP", "LOG")       # seccompy Action names (see default_action)


class SeccompError(AltoVirtError, RuntimeError):
    """Filtering cannot be turned on here; the message is one line for the user."""


_enabled = False
_programs: dict[str, bytes] = {}         # each role's compiled filter, once enabled
_prepared: dict[str, dict[str, bytes]] = {}     # default action -> _programs


class sock_fprog(ctypes.Structure):
    """<linux/filter.h>: a classic BPF program (``filter`` points at ``len`` sock_filters)."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# <asm/unistd_64.h> on x86_64, <asm-generic/unistd.h> on aarch64.
SYS_seccomp = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, 317)
SECCOMP_SET_MODE_FILTER = 1             # <linux/seccomp.h>
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET = {"TRAP": 0x00030000, "LOG": 0x7FFC0000}
PR_SET_NO_NEW_PRIVS = 38
SOCK_FILTER_SIZE = 8                    # sizeof(struct sock_filter)
CACHE_FORMAT = 1
CACHE_DIR = os.path.join(os.path.dirname(__file__), "__pycache__")


def default_action() -> str:
    """TRAP, or LOG with ALTOVIRT_SECCOMP_AUDIT=1: the kernel then logs forbidden calls
    instead of the VMM stopping, for finding what an allow-list misses."""
    return "LOG" if os.environ.get("ALTOVIRT_SECCOMP_AUDIT") == "1" else "TRAP"


def prepare() -> dict[str, bytes]:
    """Every role's program for the default action, read or compiled once per process (the
    jailer calls this before the host's files leave its view)."""
    action = default_action()
    if action not in _prepared:
        _prepared[action] = programs(action)
    return _prepared[action]


def enable(report: TextIO) -> None:
    """Turn filtering on for threads that confine themselves from now on; forbidden
    calls are reported on ``report``. Every role's program is ready when this returns."""
    global _enabled, _programs
    if not _action_available(default_action()):
        raise SeccompError("this kernel cannot load seccomp filters; run with -disable-seccomp")
    for name in LAZY_MODULES:
        importlib.import_module(name)
    # A module imported on a confined thread is compiled in memory: writing its bytecode
    # cache (mkdir, a new file) is outside every role, and would end the VMM.
    sys.dont_write_bytecode = True
    faulthandler.register(signal.SIGSYS, file=report, all_threads=False, chain=True)
    _programs = prepare()
    _enabled = True


def rules(role: str) -> tuple[Rule, ...]:
    """What ``role`` may call (see allowlists), as plain data."""
    no_exec: Condition = (2, "MASKED_EQ", 0, mmap.PROT_EXEC)
    out: list[Rule] = []
    for name in dict.fromkeys(native_name(n) for n in ROLES[role]):
        if name in ("mmap", "mprotect"):
            out.append((name, (no_exec,)))                # no new executable memory once running
        elif name == "ioctl":
            # The request is an unsigned int: compare the low 32 bits only.
            out += (("ioctl", ((1, "MASKED_EQ", request, 0xFFFFFFFF),)) for request in IOCTLS[role])
        elif name in ("socket", "socketpair"):
            families = SOCKET_FAMILIES.get(role, (socket.AF_UNIX,))
            out += ((name, ((0, "EQ", int(family), U64),)) for family in families)
        else:
            out.append((name, ()))
    return tuple(out)


def build(role: str, action: str = "TRAP") -> Filter:
    """``role``'s filter, as a seccompy Filter whose default action is ``action``."""
    from seccompy import Action, ArgCmp, CmpOp, Filter, FilterFlag
    # FLAG_LOG: the kernel records trapped calls (with their numbers) in its log.
    f = Filter(default=Action[action], flags=FilterFlag.LOG)
    for name, conditions in rules(role):
        f.allow(name, args=[ArgCmp(i, CmpOp[op], value, mask) for i, op, value, mask in conditions])
    return f


def programs(action: str, cache: str = CACHE_DIR) -> dict[str, bytes]:
    """Every role's compiled filter with default ``action``: from the file in ``cache`` when
    it holds exactly these rules compiled by this compiler, else compiled (and the file
    written where it can be)."""
    key = _cache_key(action)
    path = os.path.join(cache, f"seccomp-{action.lower()}.filters")
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    compiled = {role: build(role, action).program for role in ROLES}
    _write_cache(path, key, compiled)
    return compiled


def _cache_key(action: str) -> CacheKey:
    """What a compiled program depends on: the rules, the default action, the machine, and
    the compiler's code (seccompy's and this module's files, stamped as Python stamps
    bytecode: modification time and size)."""
    spec = importlib.machinery.PathFinder.find_spec("seccompy")
    if spec is None or spec.origin is None:
        raise SeccompError("seccompy is not installed; run with -disable-seccomp or install it")
    stamps = tuple((st.st_mtime_ns, st.st_size) for st in (os.stat(spec.origin), os.stat(__file__)))
    return (CACHE_FORMAT, action, os.uname().machine, stamps, tuple((role, rules(role)) for role in ROLES))


def _read_cache(path: str, key: CacheKey) -> dict[str, bytes] | None:
    try:
        with open(path, "rb") as f:
            saved_key, saved, crc = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return None                     # absent, unreadable, or not a cache file
    if saved_key != key or not isinstance(saved, dict) or set(saved) != set(ROLES):
        return None
    if not all(isinstance(p, bytes) and p and len(p) % SOCK_FILTER_SIZE == 0 for p in saved.values()):
        return None
    if crc != zlib.crc32(b"".join(saved[role] for role in ROLES)):
        return None                     # damaged
    return saved


def _write_cache(path: str, key: CacheKey, compiled: dict[str, bytes]) -> None:
    """Write the cache atomically; where the package is read-only, compile each time."""
    tmp = f"{path}.{os.getpid()}.tmp"
    data = marshal.dumps((key, compiled, zlib.crc32(b"".join(compiled[role] for role in ROLES))))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _action_available(action: str) -> bool:
    """Whether this kernel can load filters with ``action`` (seccomp(2): GET_ACTION_AVAIL)."""
    value = ctypes.c_uint32(SECCOMP_RET[action])
    return _libc.syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(value)) == 0


def name_thread(name: bytes) -> None:
    """Name the calling thread (for ps and the kernel log; a main thread's is the process's)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def thread_name() -> bytes:
    """The calling thread's name (prctl: a jail may have no /proc)."""
    buf = ctypes.create_string_buffer(16)
    _libc.prctl(PR_GET_NAME, buf, 0, 0, 0)
    return buf.value


def confine(role: str) -> None:
    """Name the calling thread after its Python name (for ps and the kernel log) and,
    when filtering is on, load ``role``'s filter on it. The main thread keeps its name:
    it is the process's (what ps, pgrep and psutil's name() show), as in QEMU and Firecracker."""
    thread = threading.current_thread()
    if thread is not threading.main_thread():
        name_thread(thread.name.encode())
    if _enabled:
        _load(_programs[role])


def _load(program: bytes) -> None:
    """Install a compiled filter on the calling thread (what seccompy's Filter.load does, for a
    program compiled once and loaded by many threads)."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = sock_fprog(len(program) // SOCK_FILTER_SIZE, ctypes.addressof(buf))
    if _libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG, ctypes.byref(prog)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")


if __name__ == "__main__":
    # At install time: compile both programs into the cache.
    for default in DEFAULT_ACTIONS:
        programs(default)
