"""Requests from any thread carried out on one event loop's thread, in the order they came:
how an action reaches the VMM's main thread (see actions.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..eventloop import EventLoop
from .lifecycle import StateError


class _Request:
    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class ActionQueue:
    """Requests from any thread, carried out on ``loop``'s thread in the order they came."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._closed = False

    def submit(self, work: Callable[[], object]) -> object:
        """Run ``work`` on the loop's thread; its result, or its exception raised here.
        StateError once the VMM has stopped serving requests."""
        if self._loop.in_thread():
            return work()
        request = _Request(work)
        with self._lock:
            if self._closed:
                raise StateError("the VM is shutting down")
            self._pending.append(request)
        self._loop.call_later(0, lambda: self._serve(request))
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _serve(self, request: _Request) -> None:
        with self._lock:
            if request not in self._pending:
                return
            self._pending.remove(request)
        try:
            request.result = request.work()
        except BaseException as e:      # the asking thread raises it
            request.error = e
        request.done.set()

    def close(self) -> None:
        """Refuse new requests and answer those still waiting: the VMM is stopping."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        for request in pending:
            request.error = StateError("the VM is shutting down")
            request.done.set()
