"""A raw disk image (regular file or block device) behind a virtio-blk device.

Reads and writes go straight between the file and guest RAM: preadv/pwritev
on the guest buffers' addresses (an IoVec, see memory.py). With O_DIRECT,
buffers that are not aligned to the device's logical block go through one
aligned bounce buffer instead. Images are locked with OFD byte-range locks
laid out exactly as QEMU's file driver lays them out (block/file-posix.c), so
AltoVirt and QEMU refuse each other's images just as two QEMUs do.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable

from ..memory import IoVec
from . import BackendError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
DIRECT_ALIGN = 4096             # covers 512- and 4096-byte logical blocks

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# QEMU's lock bytes: byte PERM_BASE+i is held (shared) by an opener that uses
# permission i, byte SHARED_BASE+i by one that does not let others use it.
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F
_FLOCK = struct.Struct("hhqqi4x")   # struct flock on x86_64

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_preadv, _pwritev = _libc.preadv, _libc.pwritev
for _f in (_preadv, _pwritev):
    _f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    _f.restype = ctypes.c_ssize_t


# statfs(2)'s f_type (linux/magic.h) of the file systems whose files are memory: tmpfs,
# ramfs, hugetlbfs. Their reads and writes are copies that never wait for a disk.
IN_MEMORY_FS = (0x0102_1994, 0x8584_58F6, 0x9584_58F6)
STATFS_SIZE = 120                   # struct statfs (x86_64, aarch64): f_type, a long, first


def _in_memory(fd: int) -> bool:
    """Whether the file ``fd`` (not a device node, whose own file system says nothing of
    the device) is in a file system that keeps its files in memory."""
    buf = ctypes.create_string_buffer(STATFS_SIZE)
    return _fstatfs(fd, buf) == 0 and struct.unpack_from("l", buf)[0] in IN_MEMORY_FS


def _lock(fd: int, cmd: int, kind: int, byte: int) -> bytes:
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


class BlockFile:
    def __init__(self, path: str, *, read_only: bool, direct: bool, lock: bool = True) -> None:
        """``lock`` False opens the image without its locks, for a VM that waits for a migration
        whose source still holds them: :meth:`take_locks` once the source has let go."""
        self.path = path
        self.locked = False
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.direct = direct
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                log.warning("%s: the file system refuses O_DIRECT; using the page cache", path)
                self.direct = False
                self.fd = self._open_plain(path, flags)
            else:
                raise BackendError(e.errno, f"{path}: {e.strerror}") from e
        try:
            if lock:
                self.take_locks()
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                self.size = st.st_size
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.in_memory = not self.is_block_device and _in_memory(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._local = threading.local()     # one bounce buffer per worker thread

    @staticmethod
    def _open_plain(path: str, flags: int) -> int:
        try:
            return os.open(path, flags)
        except OSError as e:
            raise BackendError(e.errno, f"{path}: {e.strerror}") from e

    def take_locks(self) -> None:
        """QEMU's scheme for a virtio-blk disk without share-rw; BackendError, with none
        taken, if another process holds or forbids what this one uses."""
        perm = BLK_PERM_CONSISTENT_READ | (0 if self.read_only else BLK_PERM_WRITE)
        shared = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
        unshared = BLK_PERM_ALL & ~shared
        try:
            for i in range(4):
                if perm & 1 << i:
                    _lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + i)
                if unshared & 1 << i:
                    _lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, RAW_LOCK_SHARED_BASE + i)
            for i in range(4):
                # Does another opener forbid what we use, or use what we forbid?
                for byte, mine in ((RAW_LOCK_SHARED_BASE + i, perm), (RAW_LOCK_PERM_BASE + i, unshared)):
                    if mine & 1 << i:
                        got = _lock(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)
                        if _FLOCK.unpack(got)[0] != fcntl.F_UNLCK:
                            raise BackendError(errno.EAGAIN, self._conflict(i))
        except BlockingIOError as e:
            self.release_locks()
            raise BackendError(errno.EAGAIN, self._conflict(1)) from e
        except BackendError:
            self.release_locks()
            raise
        self.locked = True

    def release_locks(self) -> None:
        """Let another process take the image (the destination of a live migration): as
        QEMU's source does once the guest has stopped for the last time."""
        for base in (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE):
            for i in range(4):
                _lock(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + i)
        self.locked = False

    def _conflict(self, bit: int) -> str:
        what = {0: "read", 1: "write", 2: "write", 3: "resize"}[bit]
        return (f"{self.path}: image is in use by another process (QEMU or AltoVirt), "
                f"which holds or forbids the {what} permission")

    # --- I/O (the device's I/O thread) ---
    def _bounce_buffer(self, size: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "bounce", None)
        if buf is None or len(buf) < _round_up(size):
            buf = self._local.bounce = mmap.mmap(-1, max(_round_up(size), 1 << 20))  # page-aligned
        return buf

    # O_DIRECT wants buffers aligned to the device's logical block, and Linux says EINVAL,
    # before it moves a byte, where they are not: only then do they go through the bounce
    # buffer. (Asking the kernel costs nothing; checking each buffer's address here cost
    # 70 us for a 1 MiB request of 4 KiB pages. A write that is redone rewrites the same data.)
    def read(self, offset: int, iov: IoVec) -> None:
        """Fill the buffers of ``iov`` from the image at ``offset``; OSError if it cannot."""
        try:
            self._full(_preadv, iov, offset, iov.total)
            return
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
        bounce = IoVec.of(self._bounce_buffer(iov.total), _round_up(iov.total))
        self._full(_preadv, bounce, offset, iov.total)
        at = bounce.pairs[0]
        for address, length in iov.buffers():
            ctypes.memmove(address, at, length)
            at += length

    def write(self, offset: int, iov: IoVec) -> None:
        """Write the buffers of ``iov`` to the image at ``offset``; OSError if it cannot."""
        try:
            self._full(_pwritev, iov, offset, iov.total)
            return
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
        bounce = IoVec.of(self._bounce_buffer(iov.total), iov.total)
        at = bounce.pairs[0]
        for address, length in iov.buffers():
            ctypes.memmove(at, address, length)
            at += length
        self._full(_pwritev, bounce, offset, iov.total)

    def _full(self, op: Callable[..., int], iov: IoVec, offset: int, total: int) -> None:
        """``op`` (preadv or pwritev through ctypes: the GIL let go, no object per buffer);
        OSError unless it moved all ``total`` bytes (or all the file has from ``offset``)."""
        while True:
            done = op(self.fd, iov.address, iov.count, offset)
            if done >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))
        if done < min(total, max(0, self.size - offset)):
            raise OSError(errno.EIO, f"short transfer ({done} of {total} bytes)")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if unmap else FALLOC_FL_ZERO_RANGE
        try:
            self._fallocate(mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
            zeros = mmap.mmap(-1, min(length, 1 << 20))      # page-aligned, for O_DIRECT
            for pos in range(offset, offset + length, len(zeros)):
                self.write(pos, IoVec.of(zeros, min(len(zeros), offset + length - pos)))

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)      # also drops the OFD locks
            self.fd = -1


def _round_up(n: int) -> int:
    return (n + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
