"""Drive the Linux test guest (tests/linux/guest) over its serial console, whatever VMM runs it.

``LinuxGuest(argv, log_path=...)`` starts the VMM command, which must put the guest's ttyS0 on
its stdin/stdout (AltoVirt or QEMU ``-serial stdio``), and collects everything the guest prints
into the log file as it arrives. The guest's init prints ``ALTOVIRT-GUEST-READY`` when its shell
reads commands; ``run`` then executes shell commands and returns their status and output::

    from tests.testbed import debian, guest, initramfs

    k = debian.kernel()
    argv = ["qemu-system-x86_64", "-M", "microvm", "-kernel", str(k.vmlinuz),
            "-initrd", str(initramfs.build(k)), "-append", guest.APPEND, ...]
    with guest.LinuxGuest(argv, log_path=tmp_path / "serial.log") as g:
        boot_seconds = g.wait_ready(120)
        status, out = g.run("cat /sys/block/vda/serial")
        assert g.poweroff(60) == 0

Every failure raises GuestError with the tail of the serial log (and the VMM's stderr).
Nothing written to the VMM's stdin is ever a Ctrl-A (AltoVirt's console escape): commands
travel base64-encoded.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO

from ..unixsock import read_line
from .arch import X86_64

# The x86 guest kernel's command line (each architecture's: tests/testbed/arch.py).
APPEND = X86_64.guest_append
READY = b"ALTOVIRT-GUEST-READY"
ERROR = b"ALTOVIRT-GUEST-ERROR"
EXIT = b"ALTOVIRT-GUEST-EXIT"
PANIC = b"Kernel panic - not syncing"
TAIL = 3000                   # characters of serial log quoted in an exception
# The kernel's console lines end in \r\n and start with a printk timestamp; the guest's shells
# print bare \n (stty -onlcr), so only kernel messages match. One may cut a line of output in
# two: removing it joins the halves again.
_KERNEL_LINE = re.compile(rb"\[ *\d+\.\d{6}\] [^\n]*\r\n")
_CHUNK = 1000                 # base64 characters per line sent: far below the tty's 4095
# Bytes sent before waiting for the guest to have read them: AltoVirt's UART drops input past
# 4096 bytes not yet read, and a tty line holds at most 4095.
_BATCH = 2500


class GuestError(RuntimeError):
    """The guest did not do what was asked in time, crashed, or its VMM exited."""


def stolen() -> float:
    """Seconds of CPU the host has denied the nested test bed's L1 so far (its vCPU thread
    was runnable but not running), as the host keeps writing it to ``$TESTBED_STEAL``; 0
    outside the test bed.  Waits add what was stolen while they ran to their time limit: a
    busy host makes everything in L1 slow, and a guest is only late if it was not."""
    path = os.environ.get("TESTBED_STEAL")
    if not path:
        return 0.0
    try:
        return float(Path(path).read_text())
    except (OSError, ValueError):
        return 0.0


class LinuxGuest:
    """A VMM process running the Linux test guest, with its serial console on stdin/stdout.

    The process runs in its own process group; ``kill`` (and leaving the ``with`` block) ends
    the whole group, so no VMM outlives the object. Methods are not thread-safe: drive one
    guest from one thread.
    """

    def __init__(self, argv: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> None:
        """Start ``argv``; the serial output goes to ``log_path`` (created or truncated)."""
        self.argv = argv
        self.log_path = log_path
        self._buf = bytearray()           # everything read from stdout so far
        self._stderr = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed by close()
        self._ids = itertools.count()
        self._pos = 0                     # where the next wait starts looking in _buf
        self.started = time.monotonic()
        self.boot_seconds: float | None = None   # set by wait_ready
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True, env=env)
        except OSError:
            self._log.close()
            raise
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._buf, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr, False), daemon=True),
        ]
        for t in self._readers:
            t.start()

    # -- output collection -------------------------------------------------------------------

    def _pump(self, stream: IO[bytes], into: bytearray, is_serial: bool) -> None:
        """Reader thread: append ``stream`` to ``into`` and the log until EOF."""
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):
            with self._cond:
                into.extend(chunk)
                # stderr goes to the log too, marked, as it explains most VMM failures
                self._log.write(chunk if is_serial else b"".join(
                    b"[vmm stderr] " + line + b"\n" for line in chunk.splitlines()))
                self._log.flush()
                self._cond.notify_all()
        if is_serial:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def serial(self) -> str:
        """All serial output so far, decoded leniently."""
        with self._cond:
            return self._buf.decode(errors="replace")

    def _tail(self) -> str:
        with self._cond:
            out = self._buf[-TAIL:].decode(errors="replace")
            err = self._stderr[-TAIL:].decode(errors="replace")
        status = self.proc.poll()
        return (f"VMM {'running' if status is None else f'exited with status {status}'}; "
                f"log {self.log_path}\n--- serial tail ---\n{out}"
                + (f"\n--- VMM stderr ---\n{err}" if err else ""))

    def fail(self, message: str) -> GuestError:
        """A GuestError saying ``message`` followed by the state of the VMM and the log tail."""
        return GuestError(f"{message}\n{self._tail()}")

    def _wait_for(self, pattern: re.Pattern[bytes], timeout: float, what: str) -> re.Match[bytes]:
        """The first match of ``pattern`` in output after ``self._pos``; moves ``_pos`` past it.

        Raises GuestError on timeout, on a kernel panic, or when the VMM's output ends.
        """
        deadline = time.monotonic() + timeout
        steal = stolen()
        extra = 0.0                     # stolen since the wait began, as last read
        with self._cond:
            while True:
                m = pattern.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                if PANIC in self._buf[self._pos:]:
                    raise self.fail(f"guest kernel panicked while waiting for {what}")
                if self._eof:
                    raise self.fail(f"VMM output ended while waiting for {what}")
                left = deadline + extra - time.monotonic()
                if left <= 0:
                    extra = stolen() - steal    # read only once the plain limit has passed
                    left = deadline + extra - time.monotonic()
                if left <= 0:
                    raise self.fail(f"timed out after {timeout:g} s" + _steal_note(extra)
                                    + f" waiting for {what}")
                self._cond.wait(min(left, 1.0))

    # -- driving the guest -------------------------------------------------------------------

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait for the guest's shell; returns seconds from the VMM's start to the marker.

        Raises GuestError if the init reported an error (``ALTOVIRT-GUEST-ERROR``) on the way.
        """
        m = self._wait_for(re.compile(re.escape(READY) + rb"[^\n]*\n"), timeout, "the ready marker")
        elapsed = time.monotonic() - self.started
        with self._cond:
            errors = re.findall(re.escape(ERROR) + rb"[^\n]*", self._buf[:m.start()])
        if errors:
            raise self.fail("guest init reported: " + "; ".join(e.decode(errors="replace") for e in errors))
        self.boot_seconds = elapsed
        return elapsed

    def send(self, data: bytes) -> None:
        """Write raw bytes to the serial console (never 0x01, AltoVirt's escape character)."""
        if b"\x01" in data:
            raise ValueError("0x01 would be taken by AltoVirt's console as its escape character")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self.fail("cannot write to the VMM's stdin") from None

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run ``cmd`` (any shell text, several lines allowed) in the guest's console shell.

        Returns its exit status and everything it printed (stdout and stderr, newlines as
        ``\\n``, the kernel's console messages removed). ``cmd`` runs in the shell itself, as a
        sourced file with stdin from /dev/null: ``cd`` and variables persist to the next run,
        and it must not ``exit`` (that ends the shell; use ``return N``). Raises GuestError when
        it does not finish within ``timeout`` seconds.
        """
        tok = f"{uuid.uuid4().hex[:12]}{next(self._ids)}"
        what = f"command {cmd[:200]!r}"
        self._upload(tok, base64.b64encode(cmd.encode() + b"\n").decode(), timeout, what)
        # The markers are printed from two pieces so that they never appear in what is sent.
        f = f"/tmp/.run-{tok}"
        self.send(f"printf '%s_%s\\n' @@BEGIN {tok}; base64 -d {f} > {f}.sh && . {f}.sh < /dev/null\n"
                  f"printf '%s_%s %d@@\\n' @@END {tok} $?; rm -f {f} {f}.sh\n".encode())
        begin = self._wait_for(re.compile(rb"@@BEGIN_" + tok.encode() + rb"\n"), timeout, what)
        end = self._wait_for(re.compile(rb"@@END_" + tok.encode() + rb" (\d+)@@"), timeout, what)
        with self._cond:
            raw = bytes(self._buf[begin.end():end.start()])
        out = _KERNEL_LINE.sub(b"", raw).replace(b"\r\n", b"\n")
        return int(end.group(1)), out.decode(errors="replace")

    def _upload(self, tok: str, script: str, timeout: float, what: str) -> None:
        """Append ``script`` (base64 text) to /tmp/.run-TOK in the guest, in batches of lines
        that each wait for the guest's acknowledgement before the next is sent."""
        lines = [f"echo {script[i:i + _CHUNK]} >> /tmp/.run-{tok}\n" for i in range(0, len(script), _CHUNK)]
        batch = ""
        for n, line in enumerate(lines):
            batch += line
            if len(batch) + _CHUNK > _BATCH or n == len(lines) - 1:
                self.send(f"{batch}printf '%s_%s\\n' @@ACK {tok}-{n}\n".encode())
                self._wait_for(re.compile(rb"@@ACK_" + f"{tok}-{n}".encode() + rb"\n"), timeout, what)
                batch = ""

    def check(self, cmd: str, timeout: float = 60) -> str:
        """``run`` that raises GuestError (with the output) unless the status is 0."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise self.fail(f"command {cmd!r} exited with status {status}:\n{out}")
        return out

    def wait_until(self, condition: str, what: str, seconds: int = 30) -> None:
        """Wait for shell ``condition`` to hold in the guest, polling every 0.2 s; AssertionError
        naming ``what`` if it never does."""
        status, out = self.run(f"for i in $(seq {seconds * 5}); do {condition} && return 0; sleep 0.2; "
                               "done; return 1", timeout=seconds + 30)
        assert status == 0, f"the guest never saw {what}: {out}"

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """Wait for a whole line holding ``text`` in serial output not yet consumed by a wait
        (``wait_ready``, ``run``, ``wait_for``); returns that line without its line ending."""
        m = self._wait_for(re.compile(rb"[^\n]*" + re.escape(text.encode()) + rb"[^\n]*\n"), timeout,
                           repr(text))
        return m.group(0).decode(errors="replace").strip()

    def wait_run(self, timeout: float = 120) -> int:
        """The status a ``guest.run=PATH`` program exited with (``ALTOVIRT-GUEST-EXIT``); the
        guest powers off after it."""
        line = self.wait_for(EXIT.decode(), timeout)
        return int(line.rsplit(" ", 1)[1])

    def poweroff(self, timeout: float = 60) -> int:
        """Power the guest off from its console shell; returns the VMM's exit status.

        Not ``run("poweroff")``: the shutdown may kill the shell before it prints its end marker.
        """
        self.send(b"poweroff\n")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the VMM to exit (after the guest powered off); returns its exit status."""
        deadline, steal = time.monotonic() + timeout, stolen()
        while True:
            try:
                status = self.proc.wait(max(0.0, deadline - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                extra = stolen() - steal
                if time.monotonic() >= deadline + extra:
                    raise self.fail(f"VMM still running {timeout:g} s{_steal_note(extra)} later") from None
                deadline += extra
                steal += extra
        for t in self._readers:
            t.join(5)
        return status

    def kill(self) -> None:
        """End the VMM and anything it started (its process group) at once, and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):   # it exited just now
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for t in self._readers:
            t.join(5)

    def close(self) -> None:
        """Kill the VMM if it still runs and release the pipes and the log."""
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        with self._cond:
            self._log.close()

    def __enter__(self) -> LinuxGuest:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _steal_note(extra: float) -> str:
    """The note a timeout message gets when ``extra`` s were stolen (see :func:`stolen`)."""
    return f" (and {extra:.0f} s the host gave L1 no CPU)" if extra >= 1 else ""


# -- ext4 images ---------------------------------------------------------------------------------

def make_ext4(image: Path, size: str = "64M", source: Path | None = None) -> Path:
    """Create ``image`` as an ext4 filesystem of ``size`` (mke2fs syntax: "64M"), holding a copy
    of directory ``source`` when given (``mke2fs -d``; owners and modes are kept). Returns it."""
    if image.exists():
        image.unlink()
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0"]
    if source is not None:
        cmd += ["-d", str(source)]
    _tool(*cmd, str(image), size)
    return image


def read_ext4(image: Path, path: str) -> bytes:
    """The content of ``path`` (absolute, inside the filesystem) in ext4 ``image``.

    Raises GuestError when the file is not there: debugfs itself exits 0 in that case, and
    only says so on stderr.
    """
    p = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=False)
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0 or "File not found" in err or "Couldn't find" in err:
        raise GuestError(f"debugfs {image}: cannot read {path}: {err.strip()}")
    return p.stdout


def _tool(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise GuestError(f"{' '.join(cmd)}: {p.stderr.strip() or f'exit status {p.returncode}'}")
    return p.stdout


# -- vsock, Firecracker's hybrid model (AltoVirt's vsock device) ---------------------------------

def vsock_connect(uds_path: Path, port: int, timeout: float = 30) -> socket.socket:
    """A stream to guest vsock ``port`` through the VMM's unix socket ``uds_path``.

    Sends ``CONNECT <port>`` and consumes the ``OK <hostport>`` answer, retrying while the
    socket is not there yet or the guest refuses (its listener may still be starting), until
    ``timeout``. The returned socket is blocking, with no timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            s.connect(str(uds_path))
            s.sendall(f"CONNECT {port}\n".encode())
            answer = read_line(s).strip()
            if answer.startswith(b"OK "):
                s.settimeout(None)
                return s
            problem = f"answered {answer!r}"
        except OSError as e:
            problem = str(e)
        s.close()
        if time.monotonic() >= deadline:
            raise GuestError(f"vsock {uds_path} port {port}: {problem}")
        time.sleep(0.2)


def console_shell(sock_path: Path, command: str, marker: bytes, timeout: float = 30) -> bytes:
    """Type ``command`` to the shell the guest keeps on hvc0, through the VMM's virtio-console
    socket; what came back, up to the end of the line holding ``marker``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.settimeout(timeout)
        s.sendall(command.encode() + b"\n")
        got = b""
        while marker not in got or not got.endswith(b"\n"):
            got += s.recv(4096)
    return got


def vsock_listen(uds_path: Path, port: int) -> socket.socket:
    """A listening unix socket at ``<uds_path>_<port>``, where the VMM forwards the guest's
    connections to host (CID 2) port ``port``. Remove the file when done."""
    path = Path(f"{uds_path}_{port}")
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s

