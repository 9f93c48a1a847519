"""The event loop: what stop() does to a loop whose thread is busy."""

from __future__ import annotations

import os
import threading
import time

import pytest

from altovirt import eventloop


def test_a_loop_busy_in_a_handler_is_closed_by_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() gives up waiting for a handler that does not return, but leaves the loop's
    descriptors open for it; the thread closes them once the handler returns."""
    monkeypatch.setattr(eventloop, "STOP_TIMEOUT", 0.2)
    loop = eventloop.EventLoop("busy")
    in_handler, go_on = threading.Event(), threading.Event()
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def handler() -> None:
        os.eventfd_read(fd)
        in_handler.set()
        go_on.wait(10)

    loop.add(fd, handler)
    loop.start()
    try:
        os.eventfd_write(fd, 1)
        assert in_handler.wait(10)
        started = time.monotonic()
        loop.stop()
        assert time.monotonic() - started < 2
        epoll_fd = loop._ep.fileno()
        assert not loop._ep.closed and os.fstat(epoll_fd)       # still the thread's
        loop.stop()                                             # again: nothing more
        go_on.set()
        loop._thread.join(10)
        assert not loop._thread.is_alive() and loop._ep.closed
    finally:
        go_on.set()
        os.close(fd)


def test_stop_closes_an_idle_loop() -> None:
    loop = eventloop.EventLoop("idle")
    loop.start()
    loop.stop()
    assert not loop._thread.is_alive() and loop._ep.closed
    loop.stop()
