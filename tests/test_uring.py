"""The io_uring ring behind the block device's "Async" io_engine, on real files."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.backends.uring import Ring, UringError, unavailable

REASON = unavailable()


@pytest.fixture
def ring() -> Iterator[Ring]:
    if REASON:
        pytest.skip(f"io_uring NOT AVAILABLE on this host: {REASON}")
    r = Ring(32)
    yield r
    r.close()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)


def iovecs(*bufs: ctypes.Array[ctypes.c_char]) -> array.array[int]:
    """A struct iovec[] over ``bufs``: address and length pairs."""
    return array.array("Q", [n for b in bufs for n in (ctypes.addressof(b), len(b))])


def address(iov: array.array[int]) -> int:
    return iov.buffer_info()[0]


def readable(efd: int, timeout_ms: int) -> bool:
    p = select.poll()
    p.register(efd, select.POLLIN)
    return bool(p.poll(timeout_ms))


def wait(ring: Ring, count: int) -> dict[int, int]:
    """Reap until ``count`` completions came, each tag once; res by tag."""
    done: dict[int, int] = {}
    while len(done) < count:
        assert readable(ring.eventfd, 5000), f"no completion within 5 s ({len(done)} of {count})"
        for tag, res in ring.reap():
            assert tag not in done, f"tag {tag:#x} completed twice"
            done[tag] = res
    return done


def test_writev_and_readv_several_buffers(ring: Ring, fd: int) -> None:
    parts = [os.urandom(n) for n in (100, 4096, 7)]
    bufs = [ctypes.create_string_buffer(p, len(p)) for p in parts]
    out = iovecs(*bufs)
    assert ring.writev(fd, address(out), len(bufs), 512, tag=1)
    assert ring.submit() == 1
    assert wait(ring, 1) == {1: 4203}
    assert os.pread(fd, 5000, 0) == bytes(512) + b"".join(parts)

    # Read it back into buffers split differently, two of them in an anonymous mapping.
    m = mmap.mmap(-1, 8192)
    first, second = (ctypes.c_char * 3000).from_buffer(m), (ctypes.c_char * 200).from_buffer(m, 4096)
    third = ctypes.create_string_buffer(1003)
    into = iovecs(first, second, third)
    assert ring.readv(fd, address(into), 3, 512, tag=2**64 - 1)
    assert ring.submit() == 1
    assert wait(ring, 1) == {2**64 - 1: 4203}
    assert bytes(first) + bytes(second) + third.raw == b"".join(parts)
    del first, second
    m.close()


def test_fsync_completes_with_0(ring: Ring, fd: int) -> None:
    os.pwrite(fd, b"x" * 4096, 0)
    assert ring.fsync(fd, tag=7)
    assert ring.fsync(fd, tag=8, datasync=False)
    assert ring.submit() == 2
    assert wait(ring, 2) == {7: 0, 8: 0}


def test_read_at_and_past_the_end(ring: Ring, fd: int) -> None:
    data = os.urandom(4096)
    os.pwrite(fd, data, 0)
    bufs = [ctypes.create_string_buffer(4096) for _ in range(2)]
    iovs = [iovecs(b) for b in bufs]
    assert ring.readv(fd, address(iovs[0]), 1, 3000, tag=1)
    assert ring.readv(fd, address(iovs[1]), 1, 4096, tag=2)
    assert ring.submit() == 2
    assert wait(ring, 2) == {1: 1096, 2: 0}
    assert bufs[0].raw[:1096] == data[3000:]


def test_bad_fd_completes_with_ebadf(ring: Ring, fd: int) -> None:
    closed = os.dup(fd)
    os.close(closed)
    buf = ctypes.create_string_buffer(512)
    iov = iovecs(buf)
    assert ring.readv(closed, address(iov), 1, 0, tag=1)
    assert ring.writev(closed, address(iov), 1, 0, tag=2)
    assert ring.fsync(closed, tag=3)
    assert ring.readv(fd, address(iov), 1, 0, tag=4)      # the ring goes on past failures
    assert ring.submit() == 4
    assert wait(ring, 4) == {1: -errno.EBADF, 2: -errno.EBADF, 3: -errno.EBADF, 4: 0}


def test_full_ring_refuses(fd: int) -> None:
    if REASON:
        pytest.skip(f"io_uring NOT AVAILABLE on this host: {REASON}")
    os.pwrite(fd, bytes(512), 0)
    buf = ctypes.create_string_buffer(512)
    iov = iovecs(buf)
    r = Ring(8)
    try:
        assert all(r.readv(fd, address(iov), 1, 0, tag=i) for i in range(8))
        assert not r.readv(fd, address(iov), 1, 0, tag=8)     # the SQ is full
        assert r.in_flight == 0
        assert r.submit() == 8
        assert r.in_flight == 8
        assert all(r.readv(fd, address(iov), 1, 0, tag=i) for i in range(8, 16))
        assert not r.readv(fd, address(iov), 1, 0, tag=16)     # full again
        assert r.submit() == 8
        # The SQ is empty now, but 16 in flight fill the 16 CQEs: one more could overflow them.
        assert r.in_flight == 16
        assert not r.readv(fd, address(iov), 1, 0, tag=16)
        assert wait(r, 16) == dict.fromkeys(range(16), 512)
        assert r.in_flight == 0
        assert r.readv(fd, address(iov), 1, 0, tag=16)
    finally:
        r.close()


def test_eventfd_readable_after_submit(ring: Ring, fd: int) -> None:
    os.pwrite(fd, bytes(512), 0)
    buf = ctypes.create_string_buffer(512)
    iov = iovecs(buf)
    assert ring.readv(fd, address(iov), 1, 0, tag=5)
    assert not readable(ring.eventfd, 0), "the eventfd fired before anything was submitted"
    assert ring.submit() == 1
    assert readable(ring.eventfd, 5000)
    assert ring.reap() == [(5, 512)]
    assert not readable(ring.eventfd, 0), "reap left the eventfd readable"
    assert ring.reap() == []


def test_many_ops_in_rounds(ring: Ring, fd: int) -> None:
    count = 1000
    os.pwrite(fd, b"".join(struct.pack("=Q", i * 0x9E3779B97F4A7C15 % 2**64) for i in range(count)), 0)
    bufs = [ctypes.create_string_buffer(8) for _ in range(count)]
    iovs = [iovecs(b) for b in bufs]
    tags = [(i << 40) | 0xABCDEF for i in range(count)]
    done: dict[int, int] = {}
    queued = rounds = 0
    while len(done) < count:
        while queued < count and ring.readv(fd, address(iovs[queued]), 1, 8 * queued, tags[queued]):
            queued += 1
        ring.submit()
        rounds += 1
        done.update(wait(ring, ring.in_flight))
    assert rounds >= count // 32
    assert ring.in_flight == 0
    assert done == dict.fromkeys(tags, 8)
    for i, b in enumerate(bufs):
        assert struct.unpack("=Q", b.raw)[0] == i * 0x9E3779B97F4A7C15 % 2**64


def test_close_is_idempotent(ring: Ring) -> None:
    efd = ring.eventfd
    ring.close()
    with pytest.raises(OSError) as e:
        os.fstat(efd)
    assert e.value.errno == errno.EBADF
    ring.close()
    with pytest.raises(ValueError):
        ring.fsync(0, tag=1)


def test_setup_error_is_an_oserror() -> None:
    if REASON:
        pytest.skip(f"io_uring NOT AVAILABLE on this host: {REASON}")
    with pytest.raises(UringError) as e:
        Ring(0)     # io_uring_setup refuses an empty ring
    assert isinstance(e.value, OSError)
    assert e.value.errno == errno.EINVAL
    assert "EINVAL" in str(e.value)
