"""The warm parent (``altovirt serve``): VMs started through it look, to their callers, as
VMs started directly do (output, exit status, signals, -daemonize, cgroups, the user), and
bad requests, missing parents and vanished callers change nothing but themselves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from altovirt import launch

from .conftest import KVM_PROBLEM, ROOT, Vm, altovirt_cmd
from .procs import wait_gone

pytestmark = pytest.mark.skipif(KVM_PROBLEM is not None, reason=KVM_PROBLEM or "")

CLIENT = [sys.executable, "-m", "altovirt"]
FIRECRACKER_CLIENT = [sys.executable, "-c", "from altovirt.launch import run_firecracker; run_firecracker()"]
USER = 4242


class WarmParent:
    def __init__(self, sock: Path, *options: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([*altovirt_cmd("serve", "--socket", str(sock), *options)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "altovirt serve never listened"
            time.sleep(0.02)

    def child(self) -> int:
        """The one VMM the parent runs now."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def env(self) -> dict[str, str]:
        return dict(os.environ, ALTOVIRT_SERVER=str(self.sock))

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode()


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[WarmParent]:
    parent = WarmParent(tmp_path / "warm.sock")
    yield parent
    code, err = parent.stop()
    assert code == 0 and err == ""          # it served every request without a word
    assert not parent.sock.exists()


def run(argv: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def test_a_vm_through_the_warm_parent_is_the_same_to_its_caller(probe: Path, warm: WarmParent) -> None:
    args = ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=info", "-serial", "stdio"]
    direct = run([*CLIENT, *args], dict(os.environ))
    through = run([*CLIENT, *args], warm.env())
    assert through.returncode == direct.returncode == 0
    assert through.stderr == direct.stderr == ""
    assert "probe: done ok" in through.stdout and through.stdout == direct.stdout
    # A usage error: the same one line and status 2.
    bad = ["-kernel", str(probe / "probe.elf"), "-m", "lots"]
    direct, through = run([*CLIENT, *bad], dict(os.environ)), run([*CLIENT, *bad], warm.env())
    assert through.returncode == direct.returncode == 2
    assert through.stderr == direct.stderr and through.stderr.count("\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_vmm_is_the_parents_child_in_the_callers_place(probe: Path, tmp_path: Path, warm: WarmParent,
                                                           vms: list[Vm], sig: int) -> None:
    """Forked by the warm parent, yet in the caller's cgroups and directory; the caller's
    signals reach it, and the caller ends with its status."""
    log = tmp_path / "vm.log"
    groups = _cgroups_for_test(tmp_path.name)
    try:
        vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
                "-D", "vm.log",
                launcher=["env", f"ALTOVIRT_SERVER={warm.sock}", "sh", "-c",
                          f"for g in {' '.join(str(g) for g in groups)}; do echo $$ > $g/cgroup.procs; done; "
                          f"cd {tmp_path} && exec \"$@\"", "sh", *CLIENT])
        vms.append(vm)
        vm.wait_line("probe: waiting")
        pid = warm.child()
        assert Path(f"/proc/{pid}/cwd").resolve() == tmp_path
        assert Path(f"/proc/{pid}/cgroup").read_text() == Path(f"/proc/{vm.proc.pid}/cgroup").read_text()
        assert f"/{groups[0].name}\n" in Path(f"/proc/{pid}/cgroup").read_text()
        vm.proc.send_signal(sig)
        code, err = vm.finish()
        assert code == 128 + sig and err == ""
        assert f"stopped: host-signal (exit {128 + sig})" in log.read_text()
    finally:
        for g in groups:
            wait_gone_from(g)
            g.rmdir()


def _cgroups_for_test(name: str) -> list[Path]:
    """A new cgroup in the v2 hierarchy and in v1's pids controller, where mounted."""
    out = []
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/pids")):
        if (root / "cgroup.procs").exists():
            g = root / f"altovirt-{name}"
            g.mkdir()
            out.append(g)
    if not out:
        pytest.skip("SKIPPED LOUDLY: no cgroup hierarchy mounted to place the caller in")
    return out


def wait_gone_from(group: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (group / "cgroup.procs").read_text().strip():
        assert time.monotonic() < deadline, f"{group} still has processes"
        time.sleep(0.05)


def test_a_caller_that_dies_hangs_up_its_vmm(probe: Path, tmp_path: Path, warm: WarmParent,
                                             vms: list[Vm]) -> None:
    log = tmp_path / "vm.log"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            "-D", str(log), launcher=["env", f"ALTOVIRT_SERVER={warm.sock}", *CLIENT])
    vms.append(vm)
    vm.wait_line("probe: waiting")
    pid = warm.child()
    vm.proc.kill()
    wait_gone(pid)
    assert "stopped: host-signal (exit 143)" in log.read_text()


def test_a_vmm_that_crashes_ends_its_caller_alone(probe: Path, warm: WarmParent, vms: list[Vm]) -> None:
    """The caller dies of the VMM's signal; the parent lives on and serves the next caller."""
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            launcher=["env", f"ALTOVIRT_SERVER={warm.sock}", *CLIENT])
    vms.append(vm)
    vm.wait_line("probe: waiting")
    os.kill(warm.child(), signal.SIGKILL)
    assert vm.finish()[0] == -signal.SIGKILL
    p = run([*CLIENT, "-kernel", str(probe / "probe.elf"), "-append", "probe.run=info"], warm.env())
    assert p.returncode == 0 and p.stderr == ""


def test_daemonize_through_the_warm_parent(probe: Path, tmp_path: Path, warm: WarmParent) -> None:
    pidfile, log = tmp_path / "vm.pid", tmp_path / "vm.log"
    p = run([*CLIENT, "-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-daemonize",
             "-pidfile", str(pidfile), "-D", str(log)], warm.env())
    assert p.returncode == 0 and p.stdout == p.stderr == ""
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 20
        while "value=0x2" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "stopped: host-signal (exit 143)" in log.read_text() and not pidfile.exists()


def test_firecracker_front_end_through_the_warm_parent(probe: Path, tmp_path: Path, warm: WarmParent) -> None:
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(probe / "probe.elf"),
                                                  "boot_args": "console=ttyS0 probe.run=info"},
                                  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}))
    args = ["--no-api", "--config-file", str(config)]
    direct, through = run([*FIRECRACKER_CLIENT, *args], dict(os.environ)), run([*FIRECRACKER_CLIENT, *args],
                                                                               warm.env())
    assert "probe: done ok" in through.stdout
    assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout)


def test_the_jailer_through_the_warm_parent(probe: Path, tmp_path: Path, warm: WarmParent) -> None:
    """The jail is built in the forked child: the VMM runs chrooted, as uid 4242, and says so."""
    base = tmp_path / "jails"
    jailer = [sys.executable, "-c", "from altovirt.launch import run_jailer; run_jailer()"]
    args = ["--id", "w-1", "--chroot-base-dir", str(base), "--uid", str(USER), "--gid", str(USER),
            "--source", str(probe / "probe.elf"), "--", "-kernel", "probe.elf", "-append", "probe.run=info",
            "-serial", "stdio", "-D", "/vm.log"]
    try:
        p = run([*jailer, *args], warm.env())
        assert p.returncode == 0 and p.stderr == "" and "probe: done ok" in p.stdout
        log = base / "altovirt" / "w-1" / "root" / "vm.log"
        assert "stopped: guest-reset (exit 0)" in log.read_text() and log.stat().st_uid == USER
    finally:
        subprocess.run([*jailer, "--id", "w-1", "--chroot-base-dir", str(base), "--clean"], check=True,
                       timeout=60)


def test_without_a_warm_parent_the_vm_starts_here(probe: Path, tmp_path: Path) -> None:
    args = [*CLIENT, "-kernel", str(probe / "probe.elf"), "-append", "probe.run=info", "-serial", "stdio"]
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(dead))                    # a socket file nobody listens on
    for path in (tmp_path / "missing.sock", dead):
        p = run(args, dict(os.environ, ALTOVIRT_SERVER=str(path)))
        assert p.returncode == 0 and "probe: done ok" in p.stdout
        assert p.stderr.startswith(f"altovirt: warning: no warm parent: {path}: ")
        assert p.stderr.count("\n") == 1


def _request(sock: Path, payload: bytes, fds: list[int] | None = None, close_early: bool = False) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(sock))
        if close_early:
            return None
        s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                  if fds else [])
        s.settimeout(10)
        return json.loads(s.recv(65536))


def test_bad_requests_are_refused_and_the_parent_serves_on(probe: Path, warm: WarmParent) -> None:
    good = {"prog": "altovirt", "argv": [], "cwd": "/", "env": {}, "umask": 0o22}
    stdio = [0, 1, 2]
    cases = [
        (b"not json", stdio, "malformed request"),
        (b"[1, 2]", stdio, "malformed request"),
        (json.dumps(good).encode(), [], "carries 3 descriptors"),
        (json.dumps(good).encode(), [0, 1, 2, 2], "malformed request"),
        (json.dumps({**good, "prog": "sh"}).encode(), stdio, "prog must be one of"),
        (json.dumps({**good, "argv": "-kernel x"}).encode(), stdio, "argv must be a list"),
        (json.dumps({**good, "env": {"A": 1}}).encode(), stdio, "env must map"),
        (json.dumps({**good, "umask": "022"}).encode(), stdio, "umask an integer"),
    ]
    for payload, fds, why in cases:
        reply = _request(warm.sock, payload, fds)
        assert isinstance(reply, dict) and why in reply["error"], (payload, reply)
    for _ in range(3):
        _request(warm.sock, b"", close_early=True)      # callers that go before asking
    assert warm.proc.poll() is None
    p = run([*CLIENT, "-kernel", str(probe / "probe.elf"), "-append", "probe.run=info"], warm.env())
    assert p.returncode == 0 and p.stderr == ""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="altovirt-warm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_only_allowed_users_may_ask_and_get_no_more_than_they_have(probe: Path, shared_dir: Path) -> None:
    """SO_PEERCRED: a user the parent does not allow is refused in one line; one it allows
    gets a VMM that runs as that user (which here may not open /dev/kvm: root's alone)."""
    client = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "/usr/bin/python3", "-c",
              f"import sys; sys.path.insert(0, {str(ROOT)!r}); from altovirt.launch import run; run()",
              "-kernel", str(probe / "probe.elf"), "-append", "probe.run=info"]
    for options, expect in (((), f"user {USER} may not start VMs here"),
                            (("--allow-uid", str(USER)), "/dev/kvm")):
        parent = WarmParent(shared_dir / "warm.sock", "--allow-group", str(USER), *options)
        try:
            assert oct(parent.sock.stat().st_mode & 0o777) == oct(0o660) and parent.sock.stat().st_gid == USER
            p = run(client, parent.env())
            assert p.returncode == 1 and expect in p.stderr and p.stderr.count("\n") == 1, p.stderr
        finally:
            assert parent.stop()[0] == 0


@pytest.mark.parametrize(("args", "status", "message"), [
    ([], 2, "the following arguments are required: --socket"),
    (["--socket", "{tmp}/s.sock", "--allow-uid", "abc"], 2, "argument --allow-uid: invalid int value: 'abc'"),
    (["--socket", "{tmp}/s.sock", "--allow-group", "no-grp"], 2, "--allow-group: no group 'no-grp'"),
    (["--socket", "{tmp}/absent/s.sock"], 1, "No such file or directory"),
    (["--socket", "{tmp}/file"], 1, "it exists and is not a socket"),
])
def test_serve_refuses_bad_arguments_in_one_line(tmp_path: Path, args: list[str], status: int,
                                                  message: str) -> None:
    (tmp_path / "file").write_text("a user's file, never unlinked")
    p = subprocess.run(altovirt_cmd("serve", *(a.format(tmp=tmp_path) for a in args)), capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == status and p.stdout == ""
    assert p.stderr.startswith("altovirt serve: error: ") and message in p.stderr
    assert p.stderr.count("\n") == 1
    assert (tmp_path / "file").read_text() == "a user's file, never unlinked"


def test_the_protocol_helpers_reject_what_they_cannot_read() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b'"a string"')
        with pytest.raises(ValueError, match="not a JSON object"):
            launch.receive(b, 3)
        r, w = os.pipe()
        launch.send(a, {"x": 1}, [r, w])
        with pytest.raises(ValueError, match="too many descriptors"):
            launch.receive(b, 1)
        os.close(r)
        os.close(w)
        a.close()
        assert launch.receive(b) == (None, [])


_TEXT = st.text(st.characters(exclude_categories=()))        # surrogates too: os.environ's escapes


@given(st.dictionaries(_TEXT, _TEXT | st.integers() | st.lists(_TEXT) | st.dictionaries(_TEXT, _TEXT)))
def test_a_request_is_encoded_as_json_writes_it(message: dict[str, object]) -> None:
    """The light client's own encoder (it leaves the json module out of each start) writes what
    json.dumps writes, which the warm parent's json.loads reads back."""
    assert launch.encode(message) == json.dumps(message)
    assert json.loads(launch.encode(message)) == message
