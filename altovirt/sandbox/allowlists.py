"""The system calls each AltoVirt thread may make once the VM runs: the one place to read them.

Every thread loads the filter for its role as it starts (threads it creates
inherit it). A call outside the list raises SIGSYS, which ends the VMM (see
:mod:`.seccomp`). Roles:

- ``vcpu``: runs KVM_RUN and the register accesses that exit to us; raises
  interrupts (eventfd writes) and prints the serial console.
- ``io``: the device I/O thread and the block worker pool: virtqueues, images,
  taps and unix sockets (console, vsock, the guest's XenStore connections).
- ``api``: the QMP, REST and XenStore threads: their clients. What touches the
  VM (hot-plug included) they ask of ``main`` (vmm/actions.py).
- ``main``: the main thread's event loop: the stop, the terminal, the actions
  the API asks for (pausing vCPUs, KVM state, system_reset, hot-plug: opening
  images and taps), and the teardown; also the thread that turns the PIT's tick
  reinjection off (vmm/pit.py).
- ``migration``: writes and reads snapshots, and sends or receives a VM over
  TCP or a unix socket, with KVM's dirty log of guest RAM.
- ``fork``: vm-fork's thread (vmm/fork.py), the one that may create a process. Its
  child, whose first thread it becomes, builds a whole VM under this filter before
  each of the child's threads confines itself: every other role's calls, and what a
  build makes (the VM and its vCPUs, their eventfds, sockets and threads).

``PYTHON`` is what the interpreter needs in any thread (memory, locks,
signals, time). The argument checks below are applied on top of the names.
No role but ``fork`` may create a thread or a process; none may run a program or
map executable memory: every other thread the VMM needs exists before the filters go on.
"""

from __future__ import annotations

import os
import socket

from ..backends.tap import TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ
from ..backends.vhost import VHOST_IOCTLS
from ..kvm import ioctls as K

PYTHON = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "lseek", "fstat", "newfstatat",
    "statx", "fcntl", "dup", "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "futex",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "getpid", "gettid", "getuid",
    "geteuid", "getrandom", "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
    "sched_yield", "sched_getaffinity", "set_robust_list", "rseq", "exit", "exit_group", "poll",
    "ppoll", "select", "pselect6", "eventfd2", "restart_syscall", "getcwd", "prctl",
    # A module imported once a thread is confined (a snapshot's, on the first save) lists a
    # directory of sys.path whose contents changed since the last import (the current one,
    # first on the path under "python -m", is often /tmp).
    "getdents64",
)
# Where a thread serves an epoll loop.
EPOLL = ("epoll_wait", "epoll_pwait", "epoll_ctl", "epoll_create1")
# Unix sockets: QMP, the console, vsock and XenStore (AF_UNIX only: see seccomp.build).
UNIX_SOCKETS = ("socket", "connect", "accept4", "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown",
                "getsockopt", "setsockopt", "getsockname", "getpeername")

# aarch64 has only the generic system calls (<asm-generic/unistd.h>): the C library makes
# these x86_64 ones with their successors there.
GENERIC_SUCCESSORS = {"poll": "ppoll", "select": "pselect6", "epoll_wait": "epoll_pwait",
                      "unlink": "unlinkat", "rename": "renameat", "mkdir": "mkdirat", "link": "linkat",
                      "dup2": "dup3", "chmod": "fchmodat"}
MACHINE = os.uname().machine


def native_name(name: str, machine: str = MACHINE) -> str:
    """The system call that does ``name``'s work on ``machine``."""
    return GENERIC_SUCCESSORS.get(name, name) if machine == "aarch64" else name


ROLES: dict[str, tuple[str, ...]] = {
    # Driver-OK activates a device here: it starts watching its tap or socket, or hands its
    # queues to a vhost-user back end (messages with descriptors).
    "vcpu": (*PYTHON, "ioctl", "tgkill", "epoll_ctl", "sendto", "sendmsg", "recvfrom"),
    "io": (*PYTHON, *EPOLL, *UNIX_SOCKETS,
           "ioctl", "preadv", "pwritev", "preadv2", "pwritev2", "fdatasync", "fsync", "fallocate", "openat",
           "unlink", "tgkill", "socketpair",        # socketpair: a guest's XenStore connection
           "io_uring_enter"),                       # a disk with io_engine Async (its ring made before)
    # openat: glibc's malloc reads /proc/sys/vm/overcommit_memory as it first shrinks a
    # thread's heap (after a large request, say).
    "api": (*PYTHON, *EPOLL, *UNIX_SOCKETS, "ioctl", "unlink", "openat"),
    # fstatfs: a disk image opened while the VM runs (is it in memory? see blockfile).
    "main": (*PYTHON, *EPOLL, *UNIX_SOCKETS,
             "ioctl", "tgkill", "unlink", "openat", "flock", "fdatasync", "fsync", "rename", "wait4",
             "fstatfs"),
    # bind, listen, link: migrate-incoming's listener (backends/listen.py links it into place).
    "migration": (*PYTHON, *UNIX_SOCKETS, "bind", "listen", "link", "ioctl", "openat", "preadv", "preadv2",
                  "mkdir", "mkdirat", "ftruncate", "fsync", "rename", "renameat", "renameat2", "unlink"),
}
# What a fork's child calls to build its VM that no running thread does.
BUILD = ("clone", "clone3", "wait4", "setsid", "dup2", "dup3", "pipe2", "set_tid_address",
         "timerfd_create", "timerfd_settime", "io_uring_setup", "io_uring_register", "prlimit64", "uname",
         "fchmod", "chmod", "flock", "mkdir", "ftruncate", "link", "bind", "listen", "sched_setaffinity",
         "seccomp")                # each of its threads confines itself
ROLES["fork"] = tuple(dict.fromkeys((*(name for calls in ROLES.values() for name in calls), *BUILD)))
# socket() and socketpair() families per role (argument 0): unix sockets only, but a
# migration's TCP (a fork's child may migrate too).
SOCKET_FAMILIES: dict[str, tuple[int, ...]] = {
    "migration": (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
    "fork": (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
}

TCGETS, TCSETS, TCSETSW, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = \
    0x5401, 0x5402, 0x5403, 0x541B, 0x5421, 0x5450, 0x5451
# What Python's open() (isatty), socket.setblocking and os.set_inheritable use, in any thread.
FILE_IOCTLS = (TCGETS, FIONBIO, FIONCLEX, FIOCLEX, FIONREAD)
X86_VCPU_STATE = (
    K.KVM_GET_REGS, K.KVM_SET_REGS, K.KVM_GET_SREGS, K.KVM_SET_SREGS, K.KVM_GET_MSRS, K.KVM_SET_MSRS,
    K.KVM_GET_LAPIC, K.KVM_SET_LAPIC, K.KVM_GET_MP_STATE, K.KVM_SET_MP_STATE, K.KVM_GET_VCPU_EVENTS,
    K.KVM_SET_VCPU_EVENTS, K.KVM_GET_XSAVE, K.KVM_SET_XSAVE, K.KVM_GET_XCRS, K.KVM_SET_XCRS,
    K.KVM_GET_FPU, K.KVM_SET_FPU, K.KVM_GET_DEBUGREGS, K.KVM_SET_DEBUGREGS, K.KVM_GET_CPUID2,
    K.KVM_SET_CPUID2, K.KVM_GET_TSC_KHZ, K.KVM_SET_TSC_KHZ)
X86_VM_STATE = (K.KVM_GET_CLOCK, K.KVM_SET_CLOCK, K.KVM_GET_IRQCHIP, K.KVM_SET_IRQCHIP, K.KVM_GET_PIT2,
                K.KVM_SET_PIT2, K.KVM_REINJECT_CONTROL)
# arm64: registers one by one, a reset's KVM_ARM_VCPU_INIT, and the PL011's level interrupt,
# raised by whichever thread writes or feeds it.
ARM64_VCPU_STATE = (K.KVM_GET_ONE_REG, K.KVM_SET_ONE_REG, K.KVM_GET_REG_LIST, K.KVM_ARM_VCPU_INIT,
                    K.KVM_GET_MP_STATE, K.KVM_SET_MP_STATE, K.KVM_IRQ_LINE)
# The vGIC's registers are attributes of its device fd (a snapshot's save and restore).
ARM64_VM_STATE = (K.KVM_IRQ_LINE, K.KVM_ARM_PREFERRED_TARGET, K.KVM_GET_DEVICE_ATTR, K.KVM_SET_DEVICE_ATTR)
KVM_VCPU_STATE = ARM64_VCPU_STATE if MACHINE == "aarch64" else X86_VCPU_STATE
KVM_VM_STATE = ARM64_VM_STATE if MACHINE == "aarch64" else X86_VM_STATE
SIOCGIFINDEX = 0x8933          # <linux/sockios.h>: if_nametoindex(), how a tap is found by name
# A PCI function's configuration and MSI-X writes (vCPU threads) move its notification
# ioeventfds with its BAR and route its vectors; a reset or the teardown (main) unroutes them.
PCI_IOCTLS = (K.KVM_IOEVENTFD, K.KVM_IRQFD, K.KVM_SET_GSI_ROUTING)
# ioctl request numbers per role (argument 1).
# vhost-net is started and stopped where a device is activated (vcpu) and reset (vcpu, main,
# which unplugs it too).
IOCTLS: dict[str, tuple[int, ...]] = {
    "vcpu": (*FILE_IOCTLS, K.KVM_RUN, *KVM_VCPU_STATE, TUNSETOFFLOAD, *VHOST_IOCTLS, *PCI_IOCTLS),
    "io": (*FILE_IOCTLS, TUNSETOFFLOAD, *((K.KVM_IRQ_LINE,) if MACHINE == "aarch64" else ())),
    # No KVM, no taps: the API asks the main thread for what touches the VM (vmm/actions.py).
    # Firecracker's PUT /network-interfaces looks its tap up by name.
    "api": (*FILE_IOCTLS, SIOCGIFINDEX),
    # Hot-plug opens taps; a restore puts a NIC with its saved MAC on its tap (offloads set).
    # What a snapshot asks of /dev/kvm (the host's CPUID, the MSR list) is read before the
    # filters go on.
    "main": (*FILE_IOCTLS, *KVM_VCPU_STATE, *KVM_VM_STATE, TCSETS, TCSETSW, *VHOST_IOCTLS,
             TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD, SIOCGIFINDEX, *PCI_IOCTLS),
    "migration": (*FILE_IOCTLS, K.KVM_GET_DIRTY_LOG, K.KVM_SET_USER_MEMORY_REGION),
}
KVMIO = 0xAE                    # every KVM ioctl's type (<linux/kvm.h>): a build makes the VM with them
KVM_IOCTLS = tuple(v for k, v in vars(K).items() if k.startswith("KVM_") and isinstance(v, int)
                   and v >> 8 & 0xFF == KVMIO)
IOCTLS["fork"] = tuple(dict.fromkeys((*(r for requests in IOCTLS.values() for r in requests), *KVM_IOCTLS)))
