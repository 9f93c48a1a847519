"""Memory barriers between the VMM and the guest's vCPUs, which share the virtqueues (virtio
1.2, 2.7.13 and 2.7.7-2.7.10): what the kernel's virt_mb(), virt_wmb() and virt_rmb() are to a
driver, and QEMU's smp_mb(), smp_wmb() and smp_rmb() to its devices.

``mb()`` orders earlier loads and stores before later ones, a store before a later load
included (where a device turns notifications on and looks at the ring again, or publishes
used buffers and reads whether the driver wants an interrupt); ``wmb()`` earlier stores
before later stores (the buffers and used elements before the used index); ``rmb()`` earlier
loads before later loads (the available index before the ring entries it covers).

Python has no fence of its own, so each is one instruction and a return on a page of machine
code mapped at import: x86_64's MFENCE (its loads and stores otherwise stay in order, so
``wmb`` and ``rmb`` need nothing), arm64's DMB ISH, DMB ISHST and DMB ISHLD (Arm ARM B2.3:
its accesses are observed in any order without one). A host that refuses executable memory
(W^X) gets locked operations instead, through a lock: a full barrier on x86, short of one
on arm64, which is logged.
"""

from __future__ import annotations

import ctypes as C
import logging
import mmap
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Each routine: the barrier, then a return (Intel SDM vol. 2: MFENCE 0F AE F0, RET C3; Arm ARM
# C6.2: DMB ISH, DMB ISHST, DMB ISHLD and RET, one little-endian word each).
MFENCE_RET = b"\x0f\xae\xf0\xc3"
DMB_ISH, DMB_ISHST, DMB_ISHLD, RET = 0xD5033BBF, 0xD5033ABF, 0xD50339BF, 0xD65F03C0


def _arm64(insn: int) -> bytes:
    return insn.to_bytes(4, "little") + RET.to_bytes(4, "little")


# mb, wmb, rmb: None where the machine keeps that order by itself.
_CODE: dict[str, tuple[bytes | None, ...]] = {
    "x86_64": (MFENCE_RET, None, None),
    "aarch64": (_arm64(DMB_ISH), _arm64(DMB_ISHST), _arm64(DMB_ISHLD)),
}
_ROUTINE_SIZE = 16


def _nothing() -> None:
    pass


def _map(routines: tuple[bytes | None, ...]) -> list[Callable[[], None]]:
    """Each routine as a function on one executable page (None: a function that does nothing).
    OSError if the page cannot be made executable."""
    libc = C.CDLL(None, use_errno=True)
    libc.mmap.restype = C.c_void_p
    libc.mmap.argtypes = (C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long)
    libc.mprotect.argtypes = (C.c_void_p, C.c_size_t, C.c_int)
    page = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if page in (None, C.c_void_p(-1).value):
        raise OSError(C.get_errno(), "mmap")
    for i, code in enumerate(routines):
        if code is not None:
            C.memmove(page + i * _ROUTINE_SIZE, code, len(code))
    # Made executable after it is written (never both): the kernel brings the instruction
    # cache in line with the page as it maps it executable (arm64's set_pte_at).
    if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(C.get_errno(), "mprotect")
    # PYFUNCTYPE: called with the GIL held. A barrier is one instruction; letting the GIL go
    # around it would hand the interpreter to another thread at every barrier.
    fn = C.PYFUNCTYPE(None)
    return [_nothing if code is None else fn(page + i * _ROUTINE_SIZE) for i, code in enumerate(routines)]


def _locked() -> None:
    with _LOCK:
        pass


_LOCK = threading.Lock()
try:
    mb, wmb, rmb = _map(_CODE[os.uname().machine])
except OSError as e:
    log.warning("memory barriers through locked operations (%s): executable memory is refused", e)
    mb = wmb = rmb = _locked
