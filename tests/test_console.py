"""-serial stdio on a terminal: raw mode, keys to the guest, Ctrl-A x, the terminal restored."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import termios
import time
from pathlib import Path

from .conftest import ROOT, altovirt_cmd, needs_kvm

pytestmark = needs_kvm


class Terminal:
    """altovirt running on a pseudo-terminal, as a user at a shell would run it."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.cooked = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(altovirt_cmd(*args), stdin=self.slave, stdout=self.slave,
                                     stderr=subprocess.PIPE, cwd=ROOT)
        self.screen = b""

    def expect(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, self.screen.decode(errors="replace")
            if select.select([self.master], [], [], 0.1)[0]:
                self.screen += os.read(self.master, 4096)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> tuple[int, bytes, list]:
        """Wait for exit: the status, stderr, and the terminal's attributes as left behind."""
        code = self.proc.wait(30)
        attrs = termios.tcgetattr(self.slave)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        os.close(self.master)
        os.close(self.slave)
        return code, err, attrs


def test_raw_mode_and_ctrl_c_goes_to_the_guest(probe: Path) -> None:
    t = Terminal("-kernel", str(probe / "probe.elf"), "-append", "probe.run=echo", "-serial", "stdio")
    try:
        t.expect(b"probe: echo ready")
        lflag = termios.tcgetattr(t.slave)[3]
        assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)
        t.type(b"ab\x03cd\r")                       # Ctrl-C is a byte for the guest, not SIGINT
        t.expect(b"probe: echo ab\x03cd")
        t.expect(b"probe: done ok")
    finally:
        code, err, attrs = t.close()
    assert code == 0 and err == b""
    assert attrs == t.cooked


def test_ctrl_a_x_quits_and_restores_the_terminal(probe: Path) -> None:
    t = Terminal("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio")
    try:
        t.expect(b"probe: waiting")
        t.type(b"\x01x")
    finally:
        code, err, attrs = t.close()
    assert code == 0 and err == b""
    assert attrs == t.cooked
