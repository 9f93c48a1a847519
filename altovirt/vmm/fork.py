"""vm-fork: a running VM copied into a new VMM process, which runs on beside it.

The parent stops its guest for as long as its state takes to read (what a snapshot
keeps), and forks: the child process has guest RAM copy-on-write, as ``fork()``
gives it a private anonymous mapping (guest RAM is otherwise kept out of child
processes, MADV_DONTFORK, which the fork lifts for its moment). KVM's VM belongs to
the process that made it, so the child builds a VM of its own from the parent's
configuration with the caller's changes (its own disk images, taps, sockets and
log) and takes the state into it, as a restore does (``builder.build`` with a
:class:`~.snapshot.SavedVm` whose RAM is already in place), with a new VM generation
ID. The parent's guest runs on as it was; each side's writes stay its own.

The parent's vsock connections go on; the child's guest hears a transport reset as it
starts, as a restored one does (a host socket cannot be in both VMs).

What cannot be forked: RAM shared with another process (``mem-share=on``, which a
vhost-user back end such as virtio-fs's maps) would stay shared between the two
guests; a vhost-net or vhost-vsock device's queues are served by a kernel worker
bound to the parent's memory and its vhost fd; a tap or vhost fd the caller passed
has no name to open again. Such a VM's fork is refused with one line.

A XenStore is forked with the VM: the child's starts as a copy of the parent's (as a
snapshot keeps it: the tree, the guest's watches and transactions), served on a socket
of its own; the host's clients stay with the parent.

The fork itself is made on a thread of its own (:class:`Forker`): every other
thread's seccomp filter forbids creating a process, and a child inherits its
thread's filter, so that thread's allows what building the child's VM needs (the
``fork`` role). The child forks once more and its first process ends, so that the
VM's process is nobody's child to reap (as ``-daemonize`` does); the VM reports its
start on a pipe: "ok" once it runs, or the one line saying why it could not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..errors import AltoVirtError
from ..sandbox import seccomp
from .lifecycle import RunState, StateError

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..memory import GuestMemory
    from ..snapshot.format import Section
    from .machine import Machine
    from .snapshot import SavedVm

log = logging.getLogger(__name__)

MAX_REPORT = 4096                   # bytes of a child's start report
# Signals whose parent's handlers (Python's, on the parent's objects) a child must not run.
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGCHLD)


class ForkError(AltoVirtError):
    """The VM cannot be forked, or its child did not start; the parent runs on as it was."""


@dataclass(frozen=True)
class Overrides:
    """What the child has of its own, instead of the parent's (None: the parent's, where it
    can be shared)."""

    api_channel: str | None = None          # its QMP socket's path (required if the parent has one)
    api_sock: str | None = None             # its Firecracker API socket (altovirt-firecracker's)
    drives: tuple[tuple[str, str], ...] = ()    # (drive id, image path)
    nets: tuple[tuple[str, str], ...] = ()      # (netdev id, tap name)
    console: str | None = None              # its virtio-console socket
    vsock: str | None = None                # its vsock's unix socket (uds_path)
    stdio: int | None = None                # what its stdin and stdout are (its -serial stdio)
    serial_out: str | None = None           # its serial output's file (Firecracker's serial_out_path)
    log_file: str | None = None             # its log (-D)
    xenstore: str | None = None             # its XenStore socket (-xenstore)


def check_forkable(cfg: VmConfig) -> None:
    """ForkError naming the first device or setting that cannot be copied into a child."""
    if cfg.mem_share:
        raise ForkError("a VM with mem-share=on cannot be forked: its RAM is shared with a back "
                        "end, and would stay shared between the two guests")
    if cfg.fs is not None:
        raise ForkError(f"virtio-fs '{cfg.fs.id}' cannot be forked: its vhost-user back end serves "
                        "the parent's RAM")
    for net in cfg.nets:
        if net.vhost:
            raise ForkError(f"netdev '{net.id}' cannot be forked: vhost-net's kernel worker serves "
                            "the parent's queues")
    if cfg.vsock is not None and cfg.vsock.vhost:
        raise ForkError(f"vsock '{cfg.vsock.id}' cannot be forked: vhost-vsock's kernel worker serves "
                        "the parent's queues")


def child_config(cfg: VmConfig, o: Overrides) -> VmConfig:
    """The child's configuration: the parent's with ``o`` in; ConfigError naming an override
    of nothing, or a resource the two VMs cannot share (an image both would write, a tap,
    a socket), or a name with a NUL byte in it, which no system call takes."""
    named = [*dataclasses.asdict(o).items(), *o.drives, *o.nets]
    for what, name in named:
        if isinstance(name, str) and "\0" in name:
            raise ConfigError(f"{what}: {name!r} holds a NUL byte")
    # A VM with an API channel has hot-plug slots, saved with it: the child has one if the parent has.
    if cfg.api_channel and o.api_channel is None:
        raise ConfigError("api-channel: give the child a QMP socket of its own")
    if not cfg.api_channel and o.api_channel is not None:
        raise ConfigError("api-channel: the VM has no QMP socket, so its child can have none")
    drives, nets = dict(o.drives), dict(o.nets)
    unknown = sorted((drives.keys() - {d.id for d in cfg.drives}) | (nets.keys() - {n.id for n in cfg.nets}))
    if unknown:
        raise ConfigError(f"'{unknown[0]}': the VM has no drive or netdev of that id")
    for d in cfg.drives:
        if d.id not in drives and not d.read_only:
            raise ConfigError(f"drive '{d.id}': give the child an image of its own (both VMs writing "
                              "one image would corrupt it)")
    for n in cfg.nets:
        if n.id not in nets:
            raise ConfigError(f"netdev '{n.id}': give the child a tap of its own")
    console, vsock = cfg.console, cfg.vsock
    for what, device, path in (("console", console, o.console), ("vsock", vsock, o.vsock),
                               ("xenstore", cfg.xenstore, o.xenstore)):
        if device is None and path is not None:
            raise ConfigError(f"{what}: the VM has none")
    for what, given in (("serial-fd", o.stdio), ("serial_out_path", o.serial_out)):
        if given is not None and not cfg.serial_stdio:
            raise ConfigError(f"{what}: the VM's serial console is not on stdio")
    if console is not None and o.console is None:
        raise ConfigError(f"console '{console.id}': give the child a socket of its own")
    if vsock is not None and vsock.uds_path is not None and o.vsock is None:
        raise ConfigError(f"vsock '{vsock.id}': give the child a unix socket of its own")
    if cfg.xenstore and o.xenstore is None:
        raise ConfigError("xenstore: give the child a socket of its own (its store starts as a copy)")
    theirs = {cfg.api_channel and cfg.api_channel.removeprefix("unix:"), console and console.socket_path,
              vsock and vsock.uds_path, cfg.xenstore}
    for what, path in (("api-channel", o.api_channel), ("console", o.console), ("vsock", o.vsock),
                       ("xenstore", o.xenstore)):
        if path is not None and path in theirs:
            raise ConfigError(f"{what}: {path} is the parent's; give the child a socket of its own")
    return dataclasses.replace(
        cfg,
        drives=[dataclasses.replace(d, path=drives.get(d.id, d.path)) for d in cfg.drives],
        nets=[dataclasses.replace(n, tap=nets[n.id], fd=None) for n in cfg.nets],
        console=console and dataclasses.replace(console, socket_path=o.console or ""),
        vsock=vsock and dataclasses.replace(vsock, uds_path=o.vsock),
        api_channel=o.api_channel and f"unix:{o.api_channel}",
        serial_out_path=o.serial_out or cfg.serial_out_path,
        xenstore=o.xenstore, incoming=None, log_file=o.log_file, log_stderr=False,
        pidfile=None, daemonize=False)


# What runs a child's VM (vmm/run.py's run_forked, with the parent's front end's choices),
# taking its configuration, the overrides it was made with, the state, the RAM and the fd
# it reports its start on; its exit status.
RunChild = Callable[["VmConfig", Overrides, "SavedVm", "GuestMemory", int], int]


@dataclass
class _Job:
    run: Callable[[int], int]           # in the child: runs its VM, reporting on the fd given
    mem: GuestMemory
    done: queue.SimpleQueue[int | BaseException] = dataclasses.field(default_factory=queue.SimpleQueue)


class Forker:
    """The thread that forks (see the module's docstring); :meth:`fork` hands it a job."""

    def __init__(self, run_child: RunChild) -> None:
        """Made on the main thread, whose name (the process's, as ps shows it) the child takes."""
        self.run_child = run_child
        self._process_name = seccomp.thread_name()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="fork", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def fork(self, run: Callable[[int], int], mem: GuestMemory) -> int:
        """Fork; in the parent, the read end of the pipe the child reports on (the first child
        has ended by then: its own child runs ``run`` with the write end), OSError if the fork
        failed. ``mem`` goes into the child copy-on-write."""
        job = _Job(run, mem)
        self._jobs.put(job)
        got = job.done.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def _serve(self) -> None:
        seccomp.confine("fork")
        while (job := self._jobs.get()) is not None:
            try:
                job.done.put(self._fork(job))
            except OSError as e:
                job.done.put(e)

    def _fork(self, job: _Job) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        job.mem.copied_into_children(True)
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            job.mem.copied_into_children(False)
            raise
        if pid == 0:
            os.close(r)
            threading.current_thread().name = "MainThread"
            seccomp.name_thread(self._process_name)
            _child(lambda: job.run(w))      # never returns
        os.close(w)
        job.mem.copied_into_children(False)
        os.waitpid(pid, 0)              # it has forked the VM's process and ended
        return r


def _child(run: Callable[[], int]) -> None:
    """The first child: the parent's signal handlers (on the parent's objects) gone, a session
    of its own; it forks the VM's process, which runs ``run`` and exits with its status."""
    status = 1
    try:
        for s in RESET_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        os.setsid()
        if os.fork():
            os._exit(0)
        status = run()
    except BaseException:
        log.exception("the forked VM's process failed")
    finally:
        os._exit(status)


def fork(m: Machine, o: Overrides, forker: Forker) -> int:
    """Fork ``m`` (the main thread): the child's configuration checked, the guest stopped for
    its state and the fork, and run on as it was. Returns the read end of the pipe the VM's
    process reports its start on (:func:`read_report`).
    ForkError or ConfigError, ``m`` unchanged, if it cannot be forked; SaveError if a device
    cannot be saved as it stands; StateError unless it is running or paused."""
    from . import sections
    check_forkable(m.cfg)
    cfg = child_config(m.cfg, o)
    life = m.lifecycle
    with life.lock:
        life.require(RunState.RUNNING, RunState.PAUSED)
        if life.migrating:
            raise StateError("the VM is being migrated or saved; fork it once that has ended")
        running = life.state == RunState.RUNNING
        stopped = time.monotonic()
        if running:
            m.stop_guest()
        try:
            assert m.clock is not None
            header, saved = sections.save(m, m.snapshot_msrs(), m.clock, fork=True)
            try:
                return forker.fork(lambda w: _run(forker.run_child, cfg, o, header, saved, m.mem, w), m.mem)
            except OSError as e:
                raise ForkError(f"cannot fork the VMM: {e.strerror}") from e
        finally:
            if running:
                m.start_guest()
            log.info("vm-fork: the guest stood still for %.1f ms", 1000 * (time.monotonic() - stopped))


def _run(run_child: RunChild, cfg: VmConfig, o: Overrides, header: dict[str, Any], saved: list[Section],
         mem: GuestMemory, w: int) -> int:
    """The VM's process: its pid on ``w`` first; stdin and stdout ``o.stdio`` (stdin /dev/null
    without); the parent's other descriptors let go, the state read and the VM run, reporting
    on ``w``. The parent's are not closed but made /dev/null: the Python objects that hold
    them (the parent's log handler, say) close them when they are dropped, which must not
    close whatever would have reused the number."""
    from . import sections
    from .snapshot import SavedVm
    os.write(w, f"{os.getpid()}\n".encode())
    null, stdio = os.open(os.devnull, os.O_RDWR), o.stdio
    os.dup2(null if stdio is None else stdio, 0)
    if stdio is not None:
        os.dup2(stdio, 1)
    for fd in _descriptors():
        if fd > 2 and fd not in (w, null):
            os.dup2(null, fd)
    os.close(null)
    state = sections.parse(header, {s.name: s for s in saved})
    return run_child(cfg, o, SavedVm(state, None, True), mem, w)


def _descriptors() -> list[int]:
    """This process's open descriptors (from /proc; without it, those below 4096)."""
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return [fd for fd in range(4096) if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def read_report(r: int) -> int:
    """The pid of the VM's process once it runs, from its report on the pipe ``r`` (closed
    after); ForkError with its reason if it did not start."""
    data = b""
    try:
        while len(data) < MAX_REPORT and (chunk := os.read(r, MAX_REPORT)):
            data += chunk
    finally:
        os.close(r)
    pid, _, said = data.decode(errors="replace").partition("\n")
    if not pid.isdigit():
        raise ForkError("the child ended before it started its VM")
    if said != "ok":
        raise ForkError(f"the child's VM did not start: {said or 'its process ended'}")
    return int(pid)
