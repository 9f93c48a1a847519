"""Seccomp: every VMM thread confined to its role's allow-list, a forbidden call ends the
VMM and is reported, and the argument checks hold. (The rest of the suite runs with the
filters on, which is the default, so every device and QMP command is exercised under them.)"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecInterruptedError
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt.kvm import ioctls as K
from altovirt.sandbox import seccomp
from altovirt.sandbox.allowlists import IOCTLS, ROLES, native_name

from .conftest import ROOT, Vm, needs_kvm


def thread_table(pid: int) -> dict[str, str]:
    """comm -> the Seccomp field of /proc/<pid>/task/<tid>/status, for the VMM's own threads
    (not KVM's kernel workers, such as kvm-nx-lpage-recovery, that join the process); the main
    thread, which keeps the process's name, as "(main)"."""
    table = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        name = "(main)" if int(tid) == pid else fields["Name"].strip()
        if not name.startswith("kvm-"):
            table[name] = fields["Seccomp"].strip()
    return table


@needs_kvm
@pytest.mark.parametrize("disable", [False, True])
def test_every_thread_is_confined(probe: Path, tmp_path: Path, vms: list[Vm], disable: bool) -> None:
    sock = tmp_path / "qmp.sock"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = Vm("-kernel", str(probe / "probe.elf"), "-smp", "2", "-append", "probe.run=blk,wait",
            "-drive", f"id=d0,file={disk}", "-serial", "stdio", "-api-channel", f"unix:{sock}",
            *(["-disable-seccomp"] if disable else []))
    vms.append(vm)
    vm.wait_line("probe: waiting")
    threads = thread_table(vm.proc.pid)
    # vCPUs, the device I/O thread, the block worker pool, QMP, migration, vm-fork's, and the
    # main loop.
    assert {"(main)", "vcpu0", "vcpu1", "io", "qmp", "migration", "fork",
            *(f"blk{i}" for i in range(8))} == set(threads)
    assert set(threads.values()) == ({"0"} if disable else {"2"})        # 2: SECCOMP_MODE_FILTER
    mon = QEMUMonitorProtocol(str(sock))
    mon.connect()
    assert mon.cmd_obj({"execute": "quit"}) == {"return": {}}
    with contextlib.suppress(EOFError):     # qemu.qmp reports the close that quit asked for
        mon.close()
    assert vm.finish()[0] == 0


@needs_kvm
def test_forbidden_call_ends_the_vmm_and_is_reported(probe: Path, tmp_path: Path) -> None:
    sock, log = tmp_path / "qmp.sock", tmp_path / "vm.log"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forbidden_call_vmm.py"),
                             "-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait",
                             "-api-channel", f"unix:{sock}", "-D", str(log)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mon = QEMUMonitorProtocol(str(sock))
    mon.settimeout(30)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mon.connect()
        with pytest.raises(ExecInterruptedError):      # no answer: the connection ends with the VMM
            mon.cmd_obj({"execute": "x-test-forbidden-syscall"})
        assert proc.wait(30) == -31                     # killed by SIGSYS, at once
    finally:
        with contextlib.suppress(EOFError, OSError):    # qemu.qmp reports the VMM's end on closing
            mon.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = log.read_text()
    # faulthandler's stack of the trapping thread, naming the Python line that made the call.
    stack = report[report.index("Stack (most recent call first)"):]
    assert "tests/forbidden_call_vmm.py" in stack.splitlines()[1]
    # The kernel's record names the call: chroot is 161 on x86_64.
    kernel = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert re.search(rf"type=1326 .* pid={proc.pid} .*comm=\"qmp\".* syscall=161 ", kernel), \
        "no seccomp record for the QMP thread in dmesg"


def run_confined(role: str, code: str) -> int:
    """Run ``code`` in a fresh interpreter after loading ``role``'s filter; its exit status."""
    script = textwrap.dedent(f"""
        import mmap, os, socket, fcntl, struct
        from altovirt.sandbox import seccomp
        seccomp.build({role!r}).load()
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True).returncode


@pytest.mark.parametrize("role, code, allowed", [
    ("vcpu", "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)", True),
    ("vcpu", "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)", False),   # no new code
    ("io", "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()", True),
    ("io", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)", False),     # unix sockets only
    ("vcpu", "open('/etc/hostname')", False),                               # no files
    ("api", "open('/etc/hostname').read()", True),                          # hot-plug opens
    ("io", "os.setuid(0)", False),
    ("api", "fcntl.ioctl(0, 0x5421, struct.pack('i', 0))", True),            # FIONBIO
    ("api", "fcntl.ioctl(0, 0x8004AE99, 0)", False),                        # not a KVM ioctl we use
    ("io", "os.fork()", False),                                             # threads, not processes
    ("migration", "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()", True),   # tcp: URIs
    ("migration", "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)", False),
    ("migration", "os.setuid(0)", False),
])
def test_filter_arguments(role: str, code: str, allowed: bool) -> None:
    status = run_confined(role, code)
    assert status == (0 if allowed else -31), f"{role}: {code} exited {status}"


def test_allowlists_are_consistent() -> None:
    assert set(ROLES) == set(IOCTLS) == {"vcpu", "io", "api", "main", "migration", "fork"}
    # Only vm-fork's thread may create a process or a thread (vmm/fork.py), and it may do what
    # every other thread does.
    assert {role for role, names in ROLES.items() if {"clone", "clone3", "fork"} & set(names)} == {"fork"}
    assert all(set(names) <= set(ROLES["fork"]) for names in ROLES.values())
    # The API threads ask the main thread for whatever touches the VM: no KVM for them.
    kvm = {v for n, v in vars(K).items() if n.startswith("KVM_") and isinstance(v, int) and v > 0xFFFF}
    assert not kvm & set(IOCTLS["api"])
    for role, names in ROLES.items():
        assert len(names) == len(set(names)), role
        assert "ioctl" in names and "execve" not in names and "ptrace" not in names


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_allowed_call_exists_on_each_machine(machine: str) -> None:
    """aarch64 has only the generic calls: each x86_64 name has its successor there."""
    from seccompy.syscalls import _ARCHES
    table = _ARCHES[machine][2]
    for role, names in ROLES.items():
        missing = {n for n in names if native_name(n, machine) not in table}
        assert not missing, f"{role} on {machine}: {missing}"


def test_compiled_filters_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = seccomp.programs("TRAP", str(tmp_path))
    assert compiled == {role: seccomp.build(role).program for role in ROLES}
    assert seccomp.programs("LOG", str(tmp_path)) != compiled          # one file per default action
    path = tmp_path / "seccomp-trap.filters"
    good = path.read_bytes()

    def compile_again(role: str, action: str = "TRAP") -> object:
        raise AssertionError(f"{role} compiled again")

    with monkeypatch.context() as m:
        m.setattr(seccomp, "build", compile_again)
        assert seccomp.programs("TRAP", str(tmp_path)) == compiled      # read, not compiled
    # A damaged file (a bit flipped in a program, cut short, or not a cache at all) or one
    # compiled from other rules is compiled again, and rewritten.
    flipped = bytearray(good)
    flipped[good.index(compiled["vcpu"][8:24]) + 3] ^= 0x10
    (tmp_path / "seccomp-log.filters").replace(tmp_path / "other-rules")
    for bad in (bytes(flipped), good[:len(good) // 2], b"\x00" * 64, (tmp_path / "other-rules").read_bytes()):
        path.write_bytes(bad)
        assert seccomp.programs("TRAP", str(tmp_path)) == compiled
        assert path.read_bytes() == good


@needs_kvm
def test_a_vmm_starts_without_importing_the_compiler(probe: Path) -> None:
    """With the filters compiled at install (scripts/setup), the VMM loads them from the cache."""
    subprocess.run([sys.executable, "-m", "altovirt.sandbox.seccomp"], cwd=ROOT, check=True)
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "altovirt", "-kernel",
                          str(probe / "probe.elf"), "-append", "probe.run=info", "-serial", "stdio"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "probe: done ok" in run.stdout
    assert "altovirt.sandbox.seccomp" in run.stderr and "seccompy" not in run.stderr


@needs_kvm
def test_a_vmm_run_from_read_only_sources_serves_its_first_request(probe: Path, tmp_path: Path) -> None:
    """Sources nobody compiled, on a read-only file system (a container image, say): a module
    first imported on a confined thread (the actions, with the first request for one) is compiled
    in memory. Trying to cache it on disk (mkdir) is outside every role; the VMM ended there."""
    tree = tmp_path / "src"
    shutil.copytree(ROOT / "altovirt", tree / "altovirt", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    sock = tmp_path / "qmp.sock"
    vmm = shlex.join([sys.executable, "-m", "altovirt", "-kernel", str(probe / "probe.elf"),
                      "-append", "probe.run=wait", "-api-channel", f"unix:{sock}"])
    where = shlex.quote(str(tree))
    read_only = f"mount --bind {where} {where} && mount -o remount,bind,ro {where} && exec {vmm}"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", read_only], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the VMM never listened"
            time.sleep(0.05)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect()
        assert qmp.cmd_obj({"execute": "stop"}) == {"return": {}}       # an action: see builder._handle
        # (paused, or still prelaunch if the stop came before the vCPUs started)
        assert qmp.cmd_obj({"execute": "query-status"})["return"]["status"] in ("paused", "prelaunch")
        assert qmp.cmd_obj({"execute": "quit"}) == {"return": {}}
        with contextlib.suppress(EOFError):     # qemu.qmp reports the close that quit asked for
            qmp.close()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not list(tree.rglob("__pycache__"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
