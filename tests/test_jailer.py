"""altovirt-jailer: the jail is checked from the outside (/proc/<pid>), the VM in it works,
--clean leaves nothing behind, and bad arguments get one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.sandbox import caps, namespaces

from .cabi import c_values, needs_gcc
from .conftest import KVM_PROBLEM, ROOT, ProbeReport, Vm
from .netns import NetNs, needs_netns
from .test_qmp import Raw

JAILER = str(Path(sys.executable).parent / "altovirt-jailer")
UID = GID = 4242
DEVICES = [d for d in ("/dev/kvm", "/dev/net/tun", "/dev/urandom", "/dev/null", "/dev/vhost-net",
                       "/dev/vhost-vsock") if os.path.exists(d)]
NO_CAPS = "0000000000000000"
needs_root_kvm = pytest.mark.skipif(
    KVM_PROBLEM is not None or os.geteuid() != 0,
    reason=KVM_PROBLEM or "SKIPPED LOUDLY: the jailer needs root (namespaces, mounts, cgroups)")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f)}


def cgroups_of(pid: int) -> dict[str, str]:
    """controller (or "" for v2) -> cgroup path, from /proc/<pid>/cgroup."""
    with open(f"/proc/{pid}/cgroup") as f:
        return {ctrl: path for _, ctrls, path in (ln.strip().split(":", 2) for ln in f)
                for ctrl in ctrls.split(",")}


def cgroup_mount(fstype: str, controller: str | None = None) -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            fs, _, options = right.split()[:3]
            if fs == fstype and (controller is None or controller in options.split(",")):
                return Path(left.split()[4])
    return None


def jailer(base: Path, jail_id: str, *args: str,
           pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JAILER, "--id", jail_id, "--chroot-base-dir", str(base), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          pass_fds=pass_fds)


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():                                   # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.05)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A chroot base dir; every jail left in it is cleaned afterwards, cgroups included."""
    d = tmp_path / "jails"
    yield d
    for j in (d / "altovirt").glob("*") if (d / "altovirt").is_dir() else []:
        with contextlib.suppress(OSError, ValueError):          # a VMM a failed test left running
            os.kill(int((j / "altovirt.pid").read_text()), signal.SIGKILL)
        wait_for(lambda j=j: jailer(d, j.name, "--clean").returncode == 0)


@pytest.fixture
def other_fs_kernel(probe: Path) -> Iterator[Path]:
    """The probe kernel on /dev/shm, another filesystem than the jail's: it must be bind-mounted."""
    path = Path("/dev/shm") / f"altovirt-test-{os.getpid()}.elf"
    shutil.copy(probe / "probe.elf", path)
    yield path
    path.unlink()


@needs_root_kvm
def test_jail_seen_from_outside(base: Path, tmp_path: Path, other_fs_kernel: Path, vms: list[Vm]) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    os.chown(disk, UID, GID)
    v1 = {c: cgroup_mount("cgroup", c) for c in ("cpu", "memory")}
    settings = [f"--cgroup={c}" for c in ("cpu.shares=512", "memory.limit_in_bytes=536870912")
                if v1[c.split(".")[0]]]
    vm = Vm("--id", "vm-1", "--chroot-base-dir", str(base), "--uid", str(UID), "--gid", str(GID),
            "--new-pid-ns", *settings, "--resource-limit", "no-file=256",
            "--source", str(other_fs_kernel), str(disk), "--",
            "-kernel", other_fs_kernel.name, "-drive", "id=d0,file=disk.img", "-append", "probe.run=blk,wait",
            "-serial", "stdio", "-api-channel", "unix:/qmp.sock", launcher=[JAILER])
    vms.append(vm)
    vm.wait_line("probe: waiting")
    blk0 = next(line for line in vm.seen if line.startswith("probe: blk0 "))
    assert "capacity=2048 " in blk0 and " write=ok flush=ok readback=ok " in blk0         # the disk works
    root = base / "altovirt" / "vm-1" / "root"
    pid = int((root.parent / "altovirt.pid").read_text())
    proc = Path(f"/proc/{pid}")

    st = status(pid)
    assert st["Uid"].split() == st["Gid"].split() == [str(UID)] * 4
    assert st["Groups"] == ""
    assert [st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")] == [NO_CAPS] * 5
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert st["NSpid"].split() == [str(pid), "1"]                    # PID 1 of its own namespace
    for ns in ("mnt", "uts", "ipc", "pid"):
        assert os.readlink(proc / "ns" / ns) != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(proc / "ns" / "net") == os.readlink("/proc/self/ns/net")    # no --netns
    hostname = subprocess.run(["nsenter", f"--uts={proc}/ns/uts", "hostname"], capture_output=True, text=True)
    assert hostname.stdout.strip() == "vm-1"
    limits = (proc / "limits").read_text()
    assert any(line.split()[3:5] == ["256", "256"] for line in limits.splitlines()
               if line.startswith("Max open files"))

    groups = cgroups_of(pid)
    for setting in settings:
        key, value = setting.removeprefix("--cgroup=").split("=")
        controller = key.split(".")[0]
        assert groups[controller] == "/altovirt/vm-1"
        mount = v1[controller]
        assert mount is not None
        assert (mount / "altovirt" / "vm-1" / key).read_text().strip() == value

    # Nothing in the jail but the sources, the device nodes and what the VMM made (its socket).
    assert sorted(os.listdir(proc / "root")) == sorted(["dev", "disk.img", other_fs_kernel.name, "qmp.sock"])
    nodes = sorted(str(p.relative_to(proc / "root")) for p in (proc / "root" / "dev").rglob("*")
                   if not p.is_dir())
    assert nodes == sorted(d.removeprefix("/") for d in DEVICES)
    for d in DEVICES:
        mine, host = os.stat(f"{proc}/root{d}"), os.stat(d)
        assert stat.S_ISCHR(mine.st_mode) and mine.st_rdev == host.st_rdev
        assert (mine.st_uid, mine.st_gid) == (UID, GID)
    assert os.stat(proc / "root" / "disk.img").st_ino == disk.stat().st_ino        # hard-linked
    mounts = {fields[4]: fields[5].split(",")
              for fields in map(str.split, (proc / "mountinfo").read_text().splitlines())}
    assert set(mounts) == {"/", f"/{other_fs_kernel.name}"}
    assert "ro" in mounts[f"/{other_fs_kernel.name}"]                   # the kernel is read-only

    # The host's files are out of reach, from the VMM's point of view too.
    assert not Path(f"{proc}/root{ROOT}").exists()
    raw = Raw(root / "qmp.sock")
    host_file = {"driver": "file", "filename": str(ROOT / "README.md")}
    reply = raw.call({"execute": "blockdev-add",
                      "arguments": {"node-name": "host", "driver": "raw", "file": host_file}})
    assert reply["error"]["desc"] == f"{ROOT / 'README.md'}: No such file or directory"

    busy = jailer(base, "vm-1", "--clean")
    assert (busy.returncode, busy.stderr) == (
        1, f"altovirt-jailer: error: jail vm-1 is in use by process {pid}; stop it first\n")
    assert raw.call({"execute": "quit"}) == {"return": {}}
    raw.close()
    assert vm.finish() == (0, "")

    cleaned = jailer(base, "vm-1", "--clean")
    assert (cleaned.returncode, cleaned.stdout, cleaned.stderr) == (0, "", ""), cleaned.stderr
    assert os.listdir(base) == []
    for mount in v1.values():
        assert mount is None or not (mount / "altovirt" / "vm-1").exists()
    assert disk.stat().st_nlink == 1 and other_fs_kernel.exists()        # the originals stay


@needs_netns
def test_jailed_vm_on_a_tap_in_a_netns(base: Path, probe: Path) -> None:
    """--netns: the tap exists only in that namespace, and its owner (the jail's uid) may
    attach it without CAP_NET_ADMIN; the entropy device reads /dev/urandom's kind of data."""
    ns = NetNs(("tap0",), owner=UID)
    try:
        r = jailer(base, "net-1", "--uid", str(UID), "--gid", str(GID), "--netns", ns.path,
                   "--source", str(probe / "probe.elf"), "--",
                   "-kernel", "probe.elf", "-netdev", "id=n0,netdev=tap0", "-device", "virtio-rng",
                   "-append", "probe.run=net,rng", "-serial", "stdio")
    finally:
        ns.close()
    assert r.returncode == 0, r.stderr
    assert ProbeReport.parse(r.stdout).tests == {"net": "ok", "rng": "ok"}


@needs_root_kvm
def test_daemonized_with_a_kept_capability_in_cgroup_v2(base: Path, tmp_path: Path, probe: Path) -> None:
    v2 = cgroup_mount("cgroup2")
    if v2 is None:
        pytest.skip("SKIPPED LOUDLY: this host has no cgroup2 mount; the v2 jail test cannot run")
    secret = os.open(tmp_path / "secret", os.O_RDWR | os.O_CREAT, 0o600)     # an fd the jailer inherits
    started = jailer(base, "d-1", "--uid", str(UID), "--gid", str(GID), "--daemonize",
                     "--capability", "CAP_NET_ADMIN", "--cgroup-version", "2",
                     "--cgroup", "cgroup.max.descendants=0", "--source", str(probe / "probe.elf"), "--",
                     "-kernel", "probe.elf", "-append", "probe.run=wait", "-serial", "stdio",
                     "-api-channel", "unix:/qmp.sock", pass_fds=(secret,))
    os.close(secret)
    assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
    root = base / "altovirt" / "d-1" / "root"
    pid = int((root.parent / "altovirt.pid").read_text())
    wait_for(lambda: (root / "qmp.sock").exists())
    st = status(pid)
    net_admin = f"{1 << caps.parse('net_admin'):016x}"
    assert [st[k] for k in ("CapPrm", "CapEff", "CapBnd")] == [net_admin] * 3
    assert st["CapInh"] == st["CapAmb"] == NO_CAPS
    assert os.getsid(pid) == pid                                            # its own session
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    open_files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not any(f.endswith("/secret") for f in open_files)             # inherited fds are closed
    assert cgroups_of(pid)[""] == "/altovirt/d-1"
    assert (v2 / "altovirt" / "d-1" / "cgroup.max.descendants").read_text().strip() == "0"
    raw = Raw(root / "qmp.sock")
    # The jailer's parent has left once the daemon began: the VM may still be in prelaunch.
    wait_for(lambda: raw.call({"execute": "query-status"})["return"]["status"] == "running")
    assert raw.call({"execute": "quit"}) == {"return": {}}
    raw.close()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or status(pid)["State"].startswith("Z"))
    wait_for(lambda: jailer(base, "d-1", "--clean").returncode == 0)
    assert not (v2 / "altovirt" / "d-1").exists()
    assert os.listdir(base) == []


@needs_root_kvm
def test_errors_after_the_arguments(base: Path, probe: Path) -> None:
    """A VMM error inside the jail is the VMM's own one line; a jail that exists is refused."""
    args = ("--uid", str(UID), "--gid", str(GID), "--source", str(probe / "probe.elf"), "--")
    r = jailer(base, "e-1", *args, "-kernel", "vmlinux.bin")
    assert r.returncode == 2
    assert r.stderr.startswith("altovirt: error: -kernel: vmlinux.bin") and r.stderr.count("\n") == 1
    again = jailer(base, "e-1", *args, "-kernel", "probe.elf")
    assert (again.returncode, again.stderr) == (
        1, f"altovirt-jailer: error: jail e-1 already exists at {base}/altovirt/e-1; remove it with: "
           "altovirt-jailer --id e-1 --clean\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--id", "../etc"], "--id: '../etc' may hold only letters, digits and '-' (1 to 64 of them)"),
    (["--id", "a" * 65], "may hold only letters, digits and '-'"),
    (["--uid", "0", "--gid", "4242"], "--uid/--gid 0 would run the VMM as root; add --allow-root"),
    (["--uid", "me"], "--uid: 'me' is not a numeric id"),
    (["--source", "/nonexistent/vmlinux"], "--source: /nonexistent/vmlinux: no such file"),
    (["--source", "/dev"], "--source: /dev is not a regular file or block device"),
    (["--capability", "cap_fly"], "--capability: unknown capability 'cap_fly'"),
    (["--resource-limit", "nofile=lots"], "--resource-limit nofile: 'lots' is not a non-negative"),
    (["--resource-limit", "bogus=1"], "--resource-limit: unknown limit 'bogus'; accepted: as, core"),
    (["--cgroup", "cpu.shares"], "--cgroup: expected KEY=VALUE, got 'cpu.shares'"),
    (["--cgroup", "nosuch.limit=1"], "--cgroup nosuch.limit: no cgroup v1 hierarchy has the nosuch"),
    (["--netns", "/run/netns/nosuch"], "--netns: /run/netns/nosuch: no such namespace file"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--uid", "4242", "--gid", "4242", "--"], "no VMM arguments; give them after --"),
    (["--exec-file", "/bin/true"], "--exec-file: /bin/true is not an AltoVirt VMM; give altovirt or"),
    (["--exec-file", "/nonexistent/firecracker"], "--exec-file: /nonexistent/firecracker: no such file"),
    (["--parent-cgroup", "fc"], "--parent-cgroup: not supported"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    defaults = {"--id": "ok", "--uid": "4242", "--gid": "4242"}
    extra = [x for k, v in defaults.items() if k not in args for x in (k, v)]
    tail = [] if "--" in args else ["--", "-kernel", "k"]
    p = subprocess.run([JAILER, "--chroot-base-dir", str(tmp_path / "b"), *extra, *args, *tail],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.startswith("altovirt-jailer: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert message in p.stderr
    assert not (tmp_path / "b").exists()


@needs_gcc
def test_constants_match_linux_headers() -> None:
    names = {f"CAP_{n}": i for i, n in enumerate(caps.NAMES)}
    assert c_values(("linux/capability.h",), tuple(names)) == names
    flags = {n: getattr(namespaces, n) for n in dir(namespaces) if n.startswith(("CLONE_", "MS_", "MNT_"))}
    assert c_values(("linux/sched.h", "sys/mount.h"), tuple(flags)) == flags
    assert c_values(("sys/syscall.h",), ("SYS_pivot_root",)) == {"SYS_pivot_root": namespaces.SYS_PIVOT_ROOT}


@needs_root_kvm
def test_vmm_stops_cleanly_when_its_jailer_is_killed(base: Path, probe: Path) -> None:
    """With --new-pid-ns the VMM is a child of the jailer; killing the jailer stops it as
    SIGTERM does (disks flushed), instead of leaving it running unseen."""
    vm = Vm("--id", "k-1", "--chroot-base-dir", str(base), "--uid", str(UID), "--gid", str(GID),
            "--new-pid-ns", "--source", str(probe / "probe.elf"), "--", "-kernel", "probe.elf",
            "-append", "probe.run=wait", "-serial", "stdio", "-D", "/vm.log", launcher=[JAILER])
    vm.wait_line("probe: waiting")
    jail = base / "altovirt" / "k-1"
    pid = int((jail / "altovirt.pid").read_text())
    vm.proc.kill()
    vm.finish()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or status(pid)["State"].startswith("Z"))
    assert "stopped: host-signal (exit 143)" in (jail / "root" / "vm.log").read_text()


@needs_root_kvm
def test_firecracker_jailer_flags(tmp_path: Path, probe: Path, vms: list[Vm]) -> None:
    """As a Firecracker tool runs its jailer: --exec-file names the VMM (here through a link
    called firecracker), the tool links the kernel into <base>/<exec name>/<id>/root first,
    and the VMM, as the user, serves Firecracker's API at /run/firecracker.socket in the jail."""
    from .fcapi import Firecracker
    base = Path(tempfile.mkdtemp(prefix="fj", dir="/tmp"))     # short: the socket's path must fit
    link = tmp_path / "bin" / "firecracker"
    link.parent.mkdir()
    link.symlink_to(Path(sys.executable).parent / "altovirt-firecracker")
    root = base / "altovirt-firecracker" / "fc-1" / "root"
    root.mkdir(parents=True)
    os.link(probe / "probe.elf", root / "vmlinux")
    args = ["--exec-file", str(link), "--chroot-base-dir", str(base)]
    vm = Vm("--id", "fc-1", *args, "--uid", str(UID), "--gid", str(GID), "--", "--api-sock",
            "/run/firecracker.socket", launcher=[JAILER])
    vms.append(vm)
    try:
        sock = root / "run" / "firecracker.socket"
        wait_for(sock.exists)
        assert stat.S_IMODE((root / "run").stat().st_mode) == 0o700 and (root / "run").stat().st_uid == UID
        fc = Firecracker.attach(vm, sock)
        info = fc.ok("GET", "/")
        assert isinstance(info, dict) and info["id"] == "fc-1"
        fc.ok("PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "boot_args": "probe.run=info"})
        fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert vm.line("probe: done") == "probe: done ok"
        assert vm.finish()[0] == 0
    finally:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait()
        done = subprocess.run([JAILER, "--id", "fc-1", *args, "--clean"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not (base / "altovirt-firecracker" / "fc-1").exists()
        shutil.rmtree(base)
