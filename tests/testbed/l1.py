"""The nested test bed's L1: Debian's stock kernel in QEMU TCG with emulated AMD SVM (or ARM's EL2).

The host's /dev/kvm is paravirtual (PVM) and cannot run stock kernels.  QEMU's TCG with
``-cpu max`` emulates SVM with nested paging, so Debian's kernel booted that way (L1) loads
``kvm_amd`` and offers a /dev/kvm on which AltoVirt and QEMU boot unmodified kernels (L2).
With ``arch=AARCH64`` L1 is Debian's arm64 kernel on QEMU's virt machine with EL2, whose KVM
(built in) runs arm64 guests; what differs is in tests/testbed/arch.py, and the differences
in what the command sees are listed below.

:func:`run` boots L1, runs one command in it and powers L1 off:

- L1's root is the host's root, shared read-only over 9p under a tmpfs overlay, so the
  command sees the same files (the repository, .venv, the test bed cache) at the same paths;
  /tmp, /run and /dev/shm are fresh tmpfs, /lib/modules/<release> is the cache's module tree.
- ``out_dir`` is shared read-write at the same path inside and outside (``TESTBED_OUT``).
- On arm64 the root is instead an arm64 Debian userland (tests/testbed/userland.py: busybox,
  python3.11, pylibfdt, iproute2, socat), read-only under a tmpfs overlay too; the working
  directory, the repository and the test bed cache are shared read-only under tmpfs overlays
  at their own paths, the command's name is looked up in that root's PATH (busybox's ``env``
  would run its own applet of the same name), and the command's environment has PYTHONPATH
  (the repository and its .venv's pure-Python packages, for Debian's python3 there),
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 and PYTEST_PLUGINS=pytest_timeout (the .venv's plugins
  with compiled parts cannot load, and the rest take long to import under TCG).
- The command's stdout and stderr come back on two virtio-serial ports, apart from L1's
  console (ttyS0), which is written to a log file.
- A third port carries control lines from L1: ``ready``, a heartbeat every 5 s,
  ``exit N`` and ``fail MESSAGE``.  L1 is wedged when its vCPU thread burnt a good deal of CPU
  time without a heartbeat (sooner after a soft lockup or RCU stall on the console): a host
  that gives L1 little CPU makes it slow, never wedged (see :class:`CpuClock`).  A wedged L1
  is killed, after what QEMU's monitor says of its vCPU went to the log, and the run retried
  once.

Exit statuses: the command's own, :data:`TIMEOUT` (124) when it ran past ``timeout``, or
:data:`BED_FAILURE` (125) when the test bed itself failed (L1 did not boot, wedged twice,
QEMU died); the two are never confused with a failure of the command, except that a
command may itself exit 124 or 125 (``Result.bed_error`` tells them apart).
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn

from . import arch as arches
from . import cpio, debian, userland
from . import initramfs as guest_initramfs
from .arch import X86_64, Arch
from .watch import STEAL_FILE, CpuClock, Nudges, Watch, ask_monitor, prioritize

TIMEOUT = 124                   # as timeout(1): the command did not finish in time
BED_FAILURE = 125               # the test bed failed; the command's outcome is unknown

REPO = Path(__file__).resolve().parent.parent.parent    # the repository this test bed is in
QEMU = X86_64.qemu              # the default architecture's; see tests/testbed/arch.py
# One vCPU: with two, L1 crashed ("stack guard page was hit", "corrupted stack end") or an L2
# triple-faulted in about 1 of 12 L2 boots whenever two L2 guests ran at the same time (6
# failures in ~80 such boots, with vgif on or off, 5-level paging on or off), never with
# one vCPU (30 of 30); TCG's SVM emulation evidently has a race between vCPUs.  One L2 at a
# time boots as fast on one L1 vCPU as on two (about 18 s), and leaves a host core free.
DEFAULT_CPUS = 1
DEFAULT_MEM = "8G"              # room for a 5 GiB L2 guest plus a QEMU reference run

# The x86_64 L1's modules (loaded in this order, with their dependencies), their parameters and
# kernel command line; why each: tests/testbed/arch.py, which has every architecture's.
MODULES: tuple[str, ...] = X86_64.l1_modules
MODULE_PARAMS: Mapping[str, str] = X86_64.l1_module_params
CMDLINE = X86_64.cmdline

POWEROFF_LIMIT = 60.0           # s from "exit N" until QEMU must have ended
# What to quote when L1 ends early: a panic, an oops, or stage 1 failing before it could
# open the control port.
CRASH_PATTERNS = re.compile(rb"testbed-l1: FAILED[^\n]*|Kernel panic[^\n]*|BUG: [^\n]*|Oops[^\n]*")

PORTS = ("con", "out", "err", "ctl")    # sockets QEMU connects to: console, stdout, stderr, control
MONITOR = "mon"                         # QEMU's human monitor, a socket QEMU listens on
RUN_FW_CFG = "opt/altovirt/run"


class BedError(RuntimeError):
    """The test bed failed (not the command); ``retry`` says whether another boot may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass
class Result:
    """The outcome of one :func:`run`.

    ``status`` is the command's exit status, :data:`TIMEOUT` or :data:`BED_FAILURE`;
    ``bed_error`` is set (one line) exactly when the test bed failed or timed out.
    ``output`` holds the last attempt's stdout and stderr as received, interleaved.
    """

    status: int
    output: bytes
    out_dir: Path
    l1_log: Path
    bed_error: str | None = None
    attempts: int = 1
    boot_seconds: float | None = None   # QEMU start to "ready" in the last attempt
    seconds: float = 0.0                # wall time of all attempts
    failures: list[str] = field(default_factory=list)   # each failed attempt's bed_error
    nudges: Nudges = field(default_factory=Nudges)     # a silent L1 nudged, in all attempts


# ---------------------------------------------------------------------------------------
# The initramfs

# Stage 1: PID 1 of the initramfs.  Loads the modules, opens the control port as fd 3 (kept
# across switch_root), builds the overlay root and switches into it.  Run-specific values
# (TB_MODULES, TB_OUT, TB_CWD and the command) come from the run script in fw_cfg, so this
# text, and with it the cached initramfs, is the same for every run.
STAGE1 = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "testbed-l1: $*" > /dev/console; }
die() { say "FAILED: $*"; echo "fail $*" >&3; sync; poweroff -f; }
exec 3>/dev/null
while read -r name args; do
    insmod "/modules/$name.ko" $args || die "insmod $name $args failed"
done < /modules/order
# virtio_console adds ports from a work queue, and names them a little later.
port() {
    for _ in $(seq 100); do
        for d in /sys/class/virtio-ports/*; do
            [ "$(cat "$d/name" 2>/dev/null)" = "$1" ] && [ -c "/dev/${d##*/}" ] \
                && echo "/dev/${d##*/}" && return 0
        done
        sleep 0.1
    done
    return 1
}
ctl=$(port testbed.ctl) || die "no virtio port testbed.ctl"
exec 3>"$ctl"
echo "boot $(cut -d' ' -f1 /proc/uptime)" >&3
run=/sys/firmware/qemu_fw_cfg/by_name/opt/altovirt/run/raw
[ -r "$run" ] || die "no run script in fw_cfg"
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /lower \
    || die "cannot mount the host's root (9p tag host)"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die "cannot mount the overlay root"
mkdir -p /newroot/.testbed
cp /bin/busybox /stage2 /newroot/.testbed/ && cp "$run" /newroot/.testbed/run.sh \
    || die "cannot copy stage 2"
for d in dev proc sys; do mount --move "/$d" "/newroot/$d" || die "cannot move /$d"; done
exec switch_root /newroot /.testbed/stage2
"""

# Stage 2: PID 1 in the overlay root.  Mounts what a Debian userland expects, starts the
# heartbeat, runs the command with its output on the two ports, reports its status and
# powers off.  Absolute symlinks in the host's root (/lib) resolve correctly only from here.
STAGE2 = r"""#!/.testbed/busybox sh
bb=/.testbed/busybox
say() { echo "testbed-l1: $*" > /dev/console; }
die() { say "FAILED: $*"; echo "fail $*" >&3; $bb sync; $bb poweroff -f; }
. /.testbed/run.sh
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
$bb mount -t tmpfs -o mode=0755 tmpfs /run
# Host directories shared read-only (TB_SHARES: "TAG PATH" lines), each under a tmpfs overlay
# as the root is, at their own paths; before the module tree, which may be in one of them.
share() {
    ro=/.testbed/ro/$1 rw=/.testbed/rw/$1
    $bb mkdir -p "$ro" "$rw/upper" "$rw/work" "$2" \
        && $bb mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose "$1" "$ro" \
        && $bb mount -t overlay -o "lowerdir=$ro,upperdir=$rw/upper,workdir=$rw/work" overlay "$2" \
        || die "cannot mount the host's $2 (9p tag $1)"
}
if [ -n "$TB_SHARES" ]; then
    $bb mkdir -p /.testbed/rw && $bb mount -t tmpfs -o mode=0755 tmpfs /.testbed/rw \
        || die "no tmpfs for the shared directories"
    while read -r tag path; do
        [ -z "$tag" ] || share "$tag" "$path"
    done <<SHARES
$TB_SHARES
SHARES
fi
rel=$($bb uname -r)
$bb mkdir -p "/lib/modules/$rel" && $bb mount --bind "$TB_MODULES" "/lib/modules/$rel" \
    || die "cannot bind $TB_MODULES to /lib/modules/$rel"
if [ -n "$TB_SHARE_CWD" ]; then
    $bb mkdir -p "$TB_CWD" && $bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro cwd "$TB_CWD" \
        || die "cannot mount the working directory $TB_CWD (9p tag cwd)"
fi
$bb mkdir -p "$TB_OUT" && $bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$TB_OUT" \
    || die "cannot mount the output directory $TB_OUT (9p tag out)"
$bb hostname testbed-l1
$bb ip link set lo up 2>/dev/null
port() {
    for d in /sys/class/virtio-ports/*; do
        [ "$($bb cat "$d/name")" = "$1" ] && echo "/dev/${d##*/}" && return 0
    done
    return 1
}
out=$(port testbed.stdout) && err=$(port testbed.stderr) || die "no virtio ports for stdout/stderr"
( while :; do echo "hb $($bb cut -d' ' -f1 /proc/uptime)" >&3; $bb sleep 5; done ) &
cd "$TB_CWD" || die "no directory $TB_CWD in L1 (/tmp is a fresh tmpfs there)"
echo "ready $($bb cut -d' ' -f1 /proc/uptime)" >&3
"$@" </dev/null >"$out" 2>"$err" 3>&-
echo "exit $?" >&3
$bb sync
$bb poweroff -f
"""


def initramfs(kern: debian.Kernel, arch: Arch | None = None) -> Path:
    """L1's initramfs for ``kern``, built once and cached by release and content hash.

    It holds static busybox, the two stage scripts and the modules of ``arch`` (default: the
    kernel's architecture (``l1_modules``, :data:`MODULES` on x86) with their dependencies
    (uncompressed: TCG unpacks plain data faster than it inflates).
    """
    arch = arch or arches.get(kern.arch)
    busybox = debian.unpack("busybox-static", None if arch.native else arch.deb) / "bin" / "busybox"
    mods = debian.load_order(kern, arch.l1_modules)
    names = [debian.module_name(m) for m in mods]
    order = "".join(f"{name} {arch.l1_module_params.get(name, '')}\n" for name in names)
    key = hashlib.sha256("\0".join([STAGE1, STAGE2, order, str(busybox)]).encode()).hexdigest()[:16]

    def build() -> bytes:
        members = {"init": cpio.file(STAGE1.encode(), 0o755),
                   "stage2": cpio.file(STAGE2.encode(), 0o755),
                   "bin/busybox": cpio.file(busybox.read_bytes(), 0o755),
                   "modules/order": cpio.file(order.encode()), "dev/console": cpio.chardev(5, 1)}
        for mod, name in zip(mods, names, strict=True):
            members[f"modules/{name}.ko"] = cpio.file((kern.modules / mod).read_bytes())
        return cpio.archive(members)

    return cpio.cached(debian.CACHE / "l1" / f"initramfs-{kern.release}-{key}.cpio", build)


# ---------------------------------------------------------------------------------------
# One boot of L1

def run_script(command: Sequence[str], *, cwd: Path, out_dir: Path, modules: Path,
               env: Mapping[str, str], shares: Sequence[tuple[str, Path]] = (),
               root: Path | None = None) -> str:
    """The shell fragment stage 2 sources: TB_* variables and ``set --`` with the command
    wrapped in ``env -i`` so that it sees exactly ``env``.  The root is the host's Debian, so
    coreutils' env is there; busybox's would run its own applets in place of the host's
    programs (``sh``, ``ls``, ``modprobe``).  With ``root`` (a foreign userland, where env is
    busybox's) a bare command name is first looked up in that root along ``env``'s PATH, for
    the same reason.  ``shares`` are the (9p tag, path) pairs stage 2 mounts (TB_SHARES)."""
    command = list(command)
    if root is not None and command and "/" not in command[0]:
        command[0] = _which(root, command[0], env.get("PATH", "")) or command[0]
    argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in sorted(env.items())), *command]
    share = "1" if root is None and hidden_in_l1(cwd, out_dir) else ""
    lines = "".join(f"{tag} {path}\n" for tag, path in shares)
    return (f"TB_CWD={shlex.quote(str(cwd))}\nTB_SHARE_CWD={share}\nTB_OUT={shlex.quote(str(out_dir))}\n"
            f"TB_SHARES={shlex.quote(lines)}\n"
            f"TB_MODULES={shlex.quote(str(modules))}\nset -- {shlex.join(argv)}\n")


def _which(root: Path, name: str, path: str) -> str | None:
    """Where ``name`` is along ``path`` in the tree ``root``, as a path inside it, or None."""
    for d in path.split(":"):
        if d.startswith("/") and os.path.lexists(root / d.lstrip("/") / name):
            return f"{d.rstrip('/')}/{name}"
    return None


def shares(arch: Arch, cwd: Path, out_dir: Path) -> list[tuple[str, Path]]:
    """The host directories a foreign L1 sees at their own paths (9p tag, path), parents
    first: the working directory, the repository (for PYTHONPATH) and the test bed cache (the
    kernel's modules, the guests' images); none on a native L1, which has the host's root."""
    if arch.native:
        return []
    dirs: list[Path] = []
    for d in sorted({cwd, REPO, debian.CACHE.resolve()}):
        if d != Path("/") and not d.is_relative_to(out_dir) and not any(d.is_relative_to(p) for p in dirs):
            dirs.append(d)
    return [(f"share{i}", d) for i, d in enumerate(dirs)]


def guest_assets(kern: debian.Kernel, arch: Arch) -> dict[str, str]:
    """What the command in L1 is told of the guests' (L2) kernel, L1's own (``TESTBED_KERNEL``,
    which debian.kernel reads), and in a foreign L1 their default initramfs too
    (``TESTBED_INITRD``), built here: that L1 has neither apt nor the cross compiler to find or
    build them. A native L1 reads the host's apt lists, which the host may be rewriting (an
    ``apt-get update`` beside a run once made ``apt-cache`` in L1 call them corrupted): it
    need not ask apt either."""
    if arch.native:
        return {"TESTBED_KERNEL": str(kern.vmlinuz)}
    try:
        initrd = guest_initramfs.build(kern)
    except guest_initramfs.BuildError as err:
        raise BedError(f"cannot build the {arch.name} guest's initramfs: {err}", retry=False) from None
    return {"TESTBED_KERNEL": str(kern.vmlinuz), "TESTBED_INITRD": str(initrd)}


def command_env(out_dir: Path, extra: Mapping[str, str] | None = None, arch: Arch = X86_64) -> dict[str, str]:
    """The command's environment in L1: a fixed PATH and HOME, ``CI`` and ``ALTOVIRT_*`` from
    ours, ``ALTOVIRT_TESTBED=1``, ``TESTBED_OUT``, in a foreign L1 PYTHONPATH and pytest's
    plugin choice (module docstring), and then ``extra``."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TERM": "dumb"}
    env.update({k: v for k, v in os.environ.items() if k == "CI" or k.startswith("ALTOVIRT_")})
    env.update({"ALTOVIRT_TESTBED": "1", "TESTBED_OUT": str(out_dir),
                "TESTBED_STEAL": str(out_dir / STEAL_FILE)})
    if not arch.native:
        env.update({"PYTHONPATH": ":".join(userland.python_path(REPO)),
                    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTEST_PLUGINS": "pytest_timeout"})
    env.update(extra or {})
    return env


def qemu_command(*, kern: debian.Kernel, initrd: Path, sockets: Path, out_dir: Path, script: Path,
                 cpus: int, mem: str, append: str = "", cwd: Path | None = None, root: Path = Path("/"),
                 host_dirs: Sequence[tuple[str, Path]] = (), arch: Arch | None = None) -> list[str]:
    """QEMU's command line for L1 of ``arch`` (default: the kernel's), its character devices
    connecting to ``sockets``/<port>; ``append`` is added to L1's kernel command line
    (:data:`CMDLINE` on x86); ``root`` is L1's root (9p tag ``host``), ``host_dirs`` the
    directories of :func:`shares`; ``cwd``, when L1's own /tmp or /run would hide it in the
    host's root, is shared read-only (9p tag ``cwd``)."""
    arch = arch or arches.get(kern.arch)
    # debug-threads=on names the vCPU threads ("CPU 0/TCG") for CpuClock.
    cmd = [arch.qemu, "-name", "testbed-l1,debug-threads=on", *arch.machine, "-smp", str(cpus), "-m", mem,
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kern.vmlinuz),
           "-initrd", str(initrd), "-append", f"{arch.cmdline} {append}".strip(),
           "-fw_cfg", f"name={RUN_FW_CFG},file={script}",
           "-virtfs", f"local,path={root},mount_tag=host,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={out_dir},mount_tag=out,security_model=none,multidevs=remap",
           "-device", "virtio-serial-pci,id=vser"]
    if cwd is not None and arch.native and hidden_in_l1(cwd, out_dir):
        host_dirs = [("cwd", cwd)]
    for tag, d in host_dirs:
        cmd += ["-virtfs", f"local,path={d},mount_tag={tag},security_model=none,readonly=on,multidevs=remap"]
    for port in PORTS:
        cmd += ["-chardev", f"socket,id={port},path={sockets / port}"]
    cmd += ["-chardev", f"socket,id={MONITOR},path={sockets / MONITOR},server=on,wait=off",
            "-mon", f"chardev={MONITOR},mode=readline"]
    cmd += ["-serial", "chardev:con"]
    for port, name in (("out", "stdout"), ("err", "stderr"), ("ctl", "ctl")):
        cmd += ["-device", f"virtserialport,bus=vser.0,chardev={port},name=testbed.{name}"]
    return cmd


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End QEMU: SIGTERM, then SIGKILL if it lingers (a stopped or deadlocked QEMU does)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, for QEMU to connect a chardev to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def boot_once(command: Sequence[str], *, timeout: float, cwd: Path, out_dir: Path, log: Path,
              cpus: int, mem: str, env: Mapping[str, str] | None, append: str,
              stdout: BinaryIO | None, stderr: BinaryIO | None, note: Callable[[str], None] | None = None,
              nudges: Nudges | None = None, arch: Arch = X86_64) -> tuple[int, Watch]:
    """Boot L1 once and run ``command``; the command's status, or :data:`TIMEOUT`.

    Raises :class:`BedError` when the test bed fails (``retry`` set when another boot may
    help: a wedge, or QEMU ending before the command did).  QEMU is always gone on return.
    ``note`` gets a line for each nudge of a silent L1 and each revival, which are counted in
    ``nudges``.
    """
    kern = debian.kernel(arch)
    initrd = initramfs(kern, arch)
    root = Path("/") if arch.native else userland.root(arch)
    host_dirs = shares(arch, cwd, out_dir)
    env = {**guest_assets(kern, arch), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="altovirt-l1-") as tmp, open(log, "ab") as logf:
        sockets = Path(tmp)
        script = sockets / "run.sh"
        script.write_text(run_script(command, cwd=cwd, out_dir=out_dir, modules=kern.modules,
                                     env=command_env(out_dir, env, arch), shares=host_dirs,
                                     root=None if arch.native else root))
        listeners = {port: _listen(sockets / port) for port in PORTS}
        cmd = qemu_command(kern=kern, initrd=initrd, sockets=sockets, out_dir=out_dir, script=script,
                           cpus=cpus, mem=mem, append=append, cwd=cwd, root=root, host_dirs=host_dirs,
                           arch=arch)
        logf.write(f"testbed: {shlex.join(cmd)}\n".encode())
        logf.flush()                    # before QEMU writes to the same file
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.PIPE)
        prioritize(proc.pid)
        boot = Watch(log=logf, stdout=stdout, stderr=stderr, clock=CpuClock(proc.pid),
                     monitor=sockets / MONITOR, steal_file=out_dir / STEAL_FILE, note=note,
                     nudges=nudges if nudges is not None else Nudges(), queries=arch.wedge_queries,
                     nudge_commands=arch.nudge)
        try:
            return _supervise(proc, boot, listeners, timeout), boot
        finally:
            _kill(proc)
            (out_dir / STEAL_FILE).unlink(missing_ok=True)
            for sock in listeners.values():
                sock.close()


def _supervise(proc: subprocess.Popen[bytes], boot: Watch, listeners: dict[str, socket.socket],
               timeout: float) -> int:
    """Pump QEMU's sockets into ``boot`` until the command's status is known and QEMU ended;
    the command's status or :data:`TIMEOUT`, else :class:`BedError`."""
    sel = selectors.DefaultSelector()
    try:
        _pump(proc, boot, listeners, timeout, sel)
    except _Timeout:
        return TIMEOUT
    finally:
        for key in list(sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket) and key.data[0] == "data":
                key.fileobj.close()
        sel.close()
    if boot.fail is not None:
        raise BedError(f"L1: {boot.fail}", retry=False)
    if boot.status is not None:
        return boot.status
    _stopped_early(proc, boot)


class _Timeout(Exception):
    """The command ran past its time limit."""


def _pump(proc: subprocess.Popen[bytes], boot: Watch, listeners: dict[str, socket.socket],
          timeout: float, sel: selectors.BaseSelector) -> None:
    """Feed QEMU's sockets and stderr into ``boot`` until QEMU ended (or did not end in time
    after reporting the status).  Raises :class:`BedError` on a wedge, :class:`_Timeout`."""
    assert proc.stderr is not None
    handlers: dict[str, Callable[[bytes], None]] = {
        "con": boot.on_console, "ctl": boot.on_control,
        "out": lambda d: boot.on_output(d, boot.stdout), "err": lambda d: boot.on_output(d, boot.stderr)}
    for port, sock in listeners.items():
        sel.register(sock, selectors.EVENT_READ, ("accept", port))
    sel.register(proc.stderr, selectors.EVENT_READ, ("qemu", ""))
    gone: float | None = None           # when QEMU was seen to have ended
    while sel.get_map():
        for key, _ in sel.select(1.0):
            kind, port = key.data
            if kind == "accept":
                conn, _ = listeners[port].accept()
                sel.unregister(key.fileobj)
                sel.register(conn, selectors.EVENT_READ, ("data", port))
                continue
            fileobj = key.fileobj
            data = os.read(fileobj if isinstance(fileobj, int) else fileobj.fileno(), 65536)
            if not data:
                sel.unregister(fileobj)
                if isinstance(fileobj, socket.socket):
                    fileobj.close()
            elif kind == "qemu":
                boot.qemu_err += data
                boot.on_console(data)
            else:
                handlers[port](data)
        now = time.monotonic()
        if gone is None and proc.poll() is not None:
            gone = now
        streams = [k for k in sel.get_map().values() if k.data[0] != "accept"]
        if gone is not None and (not streams or now - gone > 2):
            break                           # what QEMU wrote before it ended has been read
        if boot.exited_at is not None and now - boot.exited_at > POWEROFF_LIMIT:
            break                           # poweroff did not end QEMU; the status is known
        if boot.status is None and boot.fail is None:
            boot.publish_steal(now)
            why = boot.wedged(now)
            if why:
                boot.log.write(f"testbed: L1 wedged ({why})\n".encode())
                ask_monitor(boot, boot.queries)
                raise BedError(f"L1 wedged ({why})", retry=True)
            if boot.needs_nudge(now):
                boot.nudge(now)
            if now - boot.started > timeout:
                raise _Timeout


def _stopped_early(proc: subprocess.Popen[bytes], boot: Watch) -> NoReturn:
    """Raise the :class:`BedError` for a QEMU that ended without the command's status."""
    last = (boot.qemu_err.decode(errors="replace").strip().splitlines() or [""])[-1]
    if boot.ready is None and last:
        raise BedError(f"QEMU failed: {last}", retry=False)
    try:
        code: int | None = proc.wait(10)
    except subprocess.TimeoutExpired:
        code = None
    crash = CRASH_PATTERNS.findall(boot.console_tail)
    why = crash[0].decode(errors="replace").strip() if crash else last or "see the L1 log"
    raise BedError(f"L1 stopped before the command ended (QEMU status {code}: {why})", retry=True)


# ---------------------------------------------------------------------------------------
# The API

def hidden_in_l1(path: Path, out_dir: Path) -> bool:
    """Whether ``path`` on the host is hidden in L1 by its own /tmp, /run or /dev (the output
    directory is mounted on top, so paths in it are visible)."""
    if path.is_relative_to(out_dir):
        return False
    return any(path != Path(top) and path.is_relative_to(top) for top in ("/tmp", "/run", "/dev"))


def run(command: Sequence[str], *, timeout: float, cwd: str | os.PathLike[str] | None = None,
        out_dir: str | os.PathLike[str] | None = None, cpus: int = DEFAULT_CPUS, mem: str = DEFAULT_MEM,
        env: Mapping[str, str] | None = None, log: str | os.PathLike[str] | None = None,
        stdout: BinaryIO | None = None, stderr: BinaryIO | None = None, retry: bool = True,
        append: str = "", note: Callable[[str], None] | None = None, arch: Arch = X86_64) -> Result:
    """Run ``command`` as root in an L1 of ``arch`` and return its outcome; never raises for
    L1's failures.

    ``cwd`` (default: ours) is the command's working directory; one under /tmp or /run, which
    L1 has its own of, is shared read-only at the same path.  ``out_dir``
    (default: a fresh ``/tmp/altovirt-out-*``, created) is shared read-write at the same
    path and exported as ``TESTBED_OUT``.  ``env`` adds variables to the command's
    environment (see :func:`command_env`).  ``timeout`` bounds each attempt (boot included);
    with ``retry`` a wedged or crashed L1 is booted once more, so the worst case is two
    timeouts.  The command's output is streamed to ``stdout``/``stderr`` when given; L1's
    console goes to ``log`` (default: a fresh ``/tmp/altovirt-l1-*.log``, left for the
    caller).  ``append`` adds parameters to L1's kernel command line.  ``note`` receives
    one-line messages about the test bed (a nudge of a silent L1 and whether it came back, a
    wedge and the retry, a timeout).  A foreign ``arch`` (aarch64) changes what the command
    sees as the module docstring says.
    """
    cwd_path, out, log_path = _prepare(cwd, out_dir, log)
    result = Result(status=BED_FAILURE, output=b"", out_dir=out, l1_log=log_path)
    started = time.monotonic()
    for attempt in range(1, 3 if retry else 2):
        result.attempts = attempt
        try:
            status, boot = boot_once(command, timeout=timeout, cwd=cwd_path, out_dir=out, log=log_path,
                                     cpus=cpus, mem=mem, env=env, append=append, stdout=stdout,
                                     stderr=stderr, note=note, nudges=result.nudges, arch=arch)
        except (BedError, debian.PackageError, OSError) as err:
            again = isinstance(err, BedError) and err.retry and retry and attempt == 1
            result.bed_error = str(err)
            result.failures.append(str(err))
            if note is not None:
                note(f"testbed: {err}" + (", retrying once" if again else ""))
            if again:
                continue
            break
        _finish(result, status, boot, timeout, note)
        break
    result.seconds = time.monotonic() - started
    return result


def _prepare(cwd: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str] | None,
             log: str | os.PathLike[str] | None) -> tuple[Path, Path, Path]:
    """:func:`run`'s working directory, output directory (created) and log file (emptied)."""
    cwd_path = Path(cwd or os.getcwd()).resolve()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="altovirt-out-"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if log is None:
        fd, name = tempfile.mkstemp(prefix="altovirt-l1-", suffix=".log")
        os.close(fd)
        log = name
    log_path = Path(log)
    log_path.write_bytes(b"")        # the log of this run's attempts only
    return cwd_path, out, log_path


def _finish(result: Result, status: int, boot: Watch, timeout: float,
            note: Callable[[str], None] | None) -> None:
    """Fill ``result`` from an attempt that ended with ``status`` (the command's, or TIMEOUT)."""
    result.status, result.output = status, bytes(boot.output)
    result.boot_seconds = boot.ready - boot.started if boot.ready is not None else None
    result.bed_error = None
    if status == TIMEOUT and boot.status is None:
        result.bed_error = f"the command did not finish within {timeout:g} s"
        if note is not None:
            note(f"testbed: {result.bed_error}")

