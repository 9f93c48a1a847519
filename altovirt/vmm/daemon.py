"""-daemonize and -pidfile.

The parent waits until the daemon reports that the VM is running (or why it
failed), so ``altovirt -daemonize`` returns 0 only for a running VM and
otherwise prints the one-line error and exits non-zero.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import VMM_PROG, print_error


class Daemon:
    def __init__(self, pidfile: str | None, report_fd: int = -1) -> None:
        """``report_fd``: where a process that is already detached (a forked VM's) reports."""
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self._report_fd = report_fd

    def detach(self) -> None:
        """Fork twice; only the daemon returns from this call."""
        r, w = os.pipe()
        if os.fork() > 0:
            os.close(w)
            chunks = []
            while chunk := os.read(r, 4096):
                chunks.append(chunk)
            msg = b"".join(chunks).decode(errors="replace")
            if msg == "ok":
                os._exit(0)
            print_error(VMM_PROG, msg or "the daemon exited during start-up")
            os._exit(1)
        os.close(r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        self._report_fd = w
        if self.pidfile:
            write_pidfile(self.pidfile)

    def report(self, error: str | None) -> None:
        """Tell the waiting parent: None for running, else the error line."""
        if self._report_fd >= 0:
            os.write(self._report_fd, (error or "ok").encode())
            os.close(self._report_fd)
            self._report_fd = -1

    def cleanup(self) -> None:
        if self.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pidfile)


def write_pidfile(path: str, pid: int | None = None) -> None:
    """Write ``pid`` (ours by default) atomically, refusing to replace an existing file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid or os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)      # fails with EEXIST instead of clobbering
    finally:
        os.unlink(tmp)
