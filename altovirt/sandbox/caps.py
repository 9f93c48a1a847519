"""Linux capabilities: names, the bounding set, and the switch to an unprivileged uid.

The jailer drops every capability the user did not ask to keep, from the
bounding set too, so that nothing in the jailed process can get one back.
"""

from __future__ import annotations

import ctypes
import os

# <linux/capability.h>, in number order (CAP_CHOWN is 0).
NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# <linux/prctl.h>
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8


class __user_cap_header_struct(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class __user_cap_data_struct(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def parse(name: str) -> int:
    """The number of a capability named ``net_admin``, ``NET_ADMIN`` or ``CAP_NET_ADMIN``."""
    key = name.upper().removeprefix("CAP_")
    if key not in NAMES:
        raise ValueError(f"unknown capability {name!r} (expected a name from capabilities(7), "
                         "e.g. CAP_NET_ADMIN)")
    return NAMES.index(key)


def _bounded() -> list[int]:
    """The capabilities this kernel knows (the bounding set may hold fewer than NAMES)."""
    return [cap for cap in range(64) if _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0]


def drop_bounding_set(keep: set[int]) -> None:
    """Take every capability not in ``keep`` out of the bounding set (needs CAP_SETPCAP)."""
    for cap in _bounded():
        if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"dropping capability {cap} from the bounding set: {os.strerror(err)}")


def switch_user(uid: int, gid: int, keep: set[int]) -> None:
    """Become ``uid``:``gid`` with no supplementary groups, holding exactly ``keep``
    (effective and permitted; nothing inheritable)."""
    if _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = __user_cap_header_struct(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (__user_cap_data_struct * 2)()
    for cap in keep:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    if _libc.capset(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    _libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
