"""The host end of ``-serial stdio``: guest output to stdout, stdin to the guest.

When stdin is a terminal it is put in raw mode (restored at exit), so every
key, Ctrl-C included, reaches the guest; as in QEMU, Ctrl-A x quits the VM
and Ctrl-A Ctrl-A sends one Ctrl-A.
"""

from __future__ import annotations

import contextlib
import logging
import os
import termios
import tty
from collections.abc import Callable

from ..eventloop import EventLoop
from .vcpu import StopReason

log = logging.getLogger(__name__)

ESCAPE = 0x01           # Ctrl-A
QUIT_KEY = ord("x")
HOST_QUIT = StopReason("host-ui", False, 0)


class HostConsole:
    def __init__(self, stop: Callable[[StopReason], None], in_fd: int = 0, out_fd: int = 1) -> None:
        self._stop = stop
        self._in, self._out = in_fd, out_fd
        self._to_guest: Callable[[bytes], None] | None = None
        self._saved_tty: list | None = None
        self._escaped = False
        self._loop: EventLoop | None = None

    def attach(self, to_guest: Callable[[bytes], None]) -> None:
        self._to_guest = to_guest

    def write(self, data: bytes) -> None:
        """Guest output; a closed stdout just drops it."""
        with contextlib.suppress(BrokenPipeError, BlockingIOError):
            os.write(self._out, data)

    def start(self, loop: EventLoop) -> None:
        """Read stdin on ``loop`` (the main loop)."""
        if os.isatty(self._in):
            self._saved_tty = termios.tcgetattr(self._in)
            tty.setraw(self._in, termios.TCSANOW)
        try:
            loop.add(self._in, self._readable)
        except PermissionError:     # a regular file or /dev/null: nothing to wait for
            return
        self._loop = loop

    def _readable(self) -> None:
        try:
            data = os.read(self._in, 4096)
        except OSError as e:
            log.debug("stdin: %s", e)
            data = b""
        if not data:        # EOF: the guest simply gets no more input
            assert self._loop is not None
            self._loop.remove(self._in)
            return
        if self._saved_tty is not None:
            data = self._filter_escape(data)
        if data and self._to_guest:
            self._to_guest(data)

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escaped:
                self._escaped = False
                if b == QUIT_KEY:
                    self._stop(HOST_QUIT)
                    break
                out.append(b)
            elif b == ESCAPE:
                self._escaped = True
            else:
                out.append(b)
        return bytes(out)

    def stop(self) -> None:
        if self._saved_tty is not None:
            termios.tcsetattr(self._in, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None
