"""vm-fork on the probe: a running VM copied into a new VMM process that runs on beside it,
with its guest's memory, its own disk, console, QMP socket and VM generation ID; the
parent runs on unchanged. Forks that cannot be made are refused in one line, the parent
running on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from .conftest import Vm, needs_kvm
from .fcapi import Api, Firecracker
from .procs import wait_gone
from .test_migration import DISK_TEXT, Guest, guest_args, guest_vmgenid
from .test_migration import disk as disk  # the fixture
from .test_xenstore import needs_xs_utils
from .test_xenstore import tool as xs_tool

pytestmark = needs_kvm


class Child:
    """A forked VM: its process (nobody's child), its QMP and, on a socket, its serial console."""

    def __init__(self, pid: int, qmp_path: Path, console: socket.socket | None) -> None:
        self.pid = pid
        self.qmp = QEMUMonitorProtocol(str(qmp_path))
        self.qmp.connect(negotiate=True)
        self.console = console
        self._buffer = b""

    def cmd(self, name: str, **args: Any) -> Any:
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        assert "return" in reply, reply
        return reply["return"]

    def ask(self, command: str, answer: str, timeout: float = 20) -> str:
        """Type a command to the guest; its answer line (the probe's snapshot test)."""
        assert self.console is not None
        self.console.sendall(command.encode() + b"\n")
        want = f"probe: snap {answer}".encode()
        deadline = time.monotonic() + timeout
        while True:
            *lines, self._buffer = self._buffer.split(b"\n")
            for i, line in enumerate(lines):
                if line.startswith(want):
                    self._buffer = b"\n".join([*lines[i + 1:], self._buffer])
                    return line.decode()
            assert time.monotonic() < deadline, f"no {want!r} from the child"
            self.console.settimeout(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                self._buffer += self.console.recv(65536)

    def quit(self) -> None:
        with contextlib.suppress(EOFError):
            self.cmd("quit")
        with contextlib.suppress(EOFError, OSError):
            self.qmp.close()
        wait_gone(self.pid)


@pytest.fixture
def forked() -> Iterator[list[int]]:
    """The pids of the forked VMs a test made, killed after it (they are nobody's children)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def fork(parent: Guest, tmp_path: Path, name: str, **more: Any) -> tuple[int, socket.socket]:
    """vm-fork ``parent`` with its serial console on a new socket; the child's pid and the
    socket's other end."""
    ours, theirs = socket.socketpair()
    parent.qmp.send_fd_scm(theirs.fileno())
    parent.cmd("getfd", fdname="con")
    theirs.close()
    reply = parent.cmd("vm-fork", **{"api-channel": str(tmp_path / f"{name}.qmp"), "serial-fd": "con",
                                     "log": str(tmp_path / f"{name}.log"), **more})
    return int(reply["pid"]), ours


def test_a_forked_vm_runs_on_beside_its_parent(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm],
                                              forked: list[int]) -> None:
    parent = Guest(vms, guest_args(probe, disk), tmp_path / "parent.qmp")
    assert parent.ask("dirty 32", "dirty pages=") == "probe: snap dirty pages=32"
    before = parent.count()
    parent_id = parent.cmd("query-vm-generation-id")["guid"]
    parent_crc = parent.ask("blk", "blk read=")
    own = tmp_path / "child.img"
    own.write_bytes(b"the child's own disk".ljust(1 << 20, b"\0"))
    pid, console = fork(parent, tmp_path, "child", drives=[{"id": "disk0", "file": str(own)}])
    forked.append(pid)
    child = Child(pid, tmp_path / "child.qmp", console)
    assert child.cmd("query-status")["status"] == "running"
    # The guest's program went on where the parent's was: its counter, the pages it keeps
    # rewriting (each holds the count it was written at), its open disk, now the child's.
    assert int(child.ask("count", "count=").split("=")[1]) > before
    assert child.ask("verify", "verify=").startswith("probe: snap verify=ok pages=32")
    assert child.ask("blk", "blk read=") != parent_crc
    guid = child.cmd("query-vm-generation-id")["guid"]
    assert guid != parent_id
    assert {guid} == {str(x) for x in _child_vmgenid(child)}
    # The parent is as it was, and runs on.
    assert parent.status() == "running"
    assert parent.count() > before
    assert parent.ask("verify", "verify=").startswith("probe: snap verify=ok pages=32")
    assert parent.ask("blk", "blk read=") == parent_crc
    assert parent.cmd("query-vm-generation-id")["guid"] == parent_id == guest_vmgenid(parent).pop()
    child.quit()
    assert (tmp_path / "child.log").exists()
    parent.quit()
    assert disk.read_bytes().startswith(DISK_TEXT)


def _child_vmgenid(child: Child) -> set[str]:
    import uuid
    raw = bytes.fromhex(child.ask("vmgenid", "vmgenid=").split("=")[1])
    return {str(uuid.UUID(bytes_le=raw))}


def test_forks_that_cannot_be_made_are_refused(probe: Path, disk: Path, tmp_path: Path, vms: list[Vm],
                                               forked: list[int]) -> None:
    """One line each, the parent running on as it was; a child that cannot build its VM ends
    with the reason, which the parent's caller gets."""
    parent = Guest(vms, guest_args(probe, disk), tmp_path / "parent.qmp")
    own = [{"id": "disk0", "file": str(tmp_path / "missing.img")}]
    child = str(tmp_path / "c.qmp")
    for args, problem in (
            ({}, "api-channel: give the child a QMP socket of its own"),
            ({"api-channel": child}, "drive 'disk0': give the child an image of its own (both VMs "
                                     "writing one image would corrupt it)"),
            ({"api-channel": child, "drives": [{"id": "disk9", "file": "x"}]},
             "'disk9': the VM has no drive or netdev of that id"),
            ({"drives": [{"id": "disk0"}]}, "Parameter 'drives[0].file' is missing"),
            ({"drives": ["disk0"]}, "Invalid parameter 'drives[0]'"),
            ({"drives": own, "api-channel": str(tmp_path / "parent.qmp")},
             f"api-channel: {tmp_path / 'parent.qmp'} is the parent's; give the child a socket of its own"),
            ({"api-channel": child, "drives": own, "console": "/tmp/x.sock"}, "console: the VM has none"),
            ({"api-channel": child, "drives": [{"id": "disk0", "file": "a\0b"}]},
             "disk0: 'a\\x00b' holds a NUL byte"),
            ({"api-channel": child, "drives": own, "serial-fd": "nothing"},
             "File descriptor named 'nothing' has not been found"),
            ({"api-channel": child, "drives": own},
             f"the child's VM did not start: -drive id=disk0: {tmp_path / 'missing.img'}: "
             "No such file or directory"),
            ({"api-channel": child, "drives": [{"id": "disk0", "file": str(disk)}]},
             "image is in use by another process")):
        assert problem in parent.error("vm-fork", **args), args
    assert parent.status() == "running"
    before = parent.count()
    assert parent.count() > before
    parent.quit()


def test_a_vm_sharing_its_ram_is_not_forked(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    parent = Guest(vms, ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=snapshot",
                         "-serial", "stdio", "-machine", "mem-share=on"], tmp_path / "parent.qmp")
    assert parent.error("vm-fork") == ("a VM with mem-share=on cannot be forked: its RAM is shared with a "
                                       "back end, and would stay shared between the two guests")
    assert parent.status() == "running"
    parent.quit()


def test_a_hundred_forks_of_one_parent(probe: Path, tmp_path: Path, vms: list[Vm], forked: list[int]) -> None:
    """Each with a VM generation ID of its own; the parent runs on through them all. The guest
    halts (the probe's idle test): a hundred busy guests would share two host cores."""
    parent = Guest(vms, ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=idle",
                         "-serial", "stdio"], tmp_path / "parent.qmp", ready=False)
    parent.vm.wait_line("probe: idle")
    ids = {parent.cmd("query-vm-generation-id")["guid"]}
    for n in range(100):
        pid = parent.cmd("vm-fork", **{"api-channel": str(tmp_path / f"c{n}.qmp")})["pid"]
        forked.append(pid)
        child = Child(pid, tmp_path / f"c{n}.qmp", None)
        assert child.cmd("query-status")["status"] == "running"
        ids.add(child.cmd("query-vm-generation-id")["guid"])
        with contextlib.suppress(EOFError, OSError):
            child.qmp.close()
    assert len(ids) == 101
    assert all(Path(f"/proc/{pid}").exists() for pid in forked)
    assert parent.status() == "running"
    for pid in forked:
        os.kill(pid, signal.SIGTERM)
    for pid in forked:
        wait_gone(pid)
    parent.quit()


def _wait_file_line(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


def test_a_firecracker_vm_forks_through_its_rest_api(probe: Path, tmp_path: Path, vms: list[Vm],
                                                     forked: list[int]) -> None:
    """PUT /snapshot/fork: the child is an ``altovirt-firecracker`` process of its own, with the
    parent's instance id, its own API socket, disk, serial output file and log; each takes its
    own actions. Bad requests are 400s, the parent running on; the child forks in turn."""
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"the parent's root".ljust(1 << 20, b"\0"))
    own = tmp_path / "child.ext4"
    own.write_bytes(b"the child's root".ljust(1 << 20, b"\0"))
    fc = Firecracker(vms, tmp_path / "parent.sock", "--id", "fleet-7")

    def child_body(name: str, disk: Path) -> dict[str, Any]:
        return {"api_sock": str(tmp_path / f"{name}.sock"), "serial_out_path": str(tmp_path / f"{name}.out"),
                "log_path": str(tmp_path / f"{name}.log"),
                "drive_overrides": [{"drive_id": "rootfs", "path_on_host": str(disk)}]}

    body = child_body("child", own)
    assert "not supported before starting" in fc.fault("PUT", "/snapshot/fork", body)
    fc.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(image), "is_root_device": True})
    fc.ok("PUT", "/boot-source", {"kernel_image_path": str(probe / "probe.elf"),
                                  "boot_args": "console=ttyS0 probe.run=keyboard"})
    fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.vm.wait_line("probe: keyboard waiting")
    for bad, problem in (
            ({k: v for k, v in body.items() if k != "api_sock"}, "missing field `api_sock`"),
            ({**body, "drive_overrides": []}, "Fork microVM error: drive 'rootfs': give the child an image "
                                              "of its own"),
            ({**body, "drive_overrides": [{"drive_id": "rootfs"}]}, "missing field `path_on_host`"),
            ({**body, "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap9"}]},
             "'eth9': the VM has no drive or netdev of that id"),
            ({**body, "vsock_override": {"uds_path": "/tmp/v.sock"}}, "vsock: the VM has none"),
            ({**body, "qmp_sock": str(tmp_path / "c.qmp")}, "the VM has no QMP socket"),
            ({**body, "log_path": "/tmp/a\0b"},
             "Fork microVM error: log_file: '/tmp/a\\x00b' holds a NUL byte"),
            ({**body, "api_sock": str(tmp_path / "parent.sock")},
             f"the child's VM did not start: api_sock: {tmp_path / 'parent.sock'} already exists")):
        assert problem in fc.fault("PUT", "/snapshot/fork", bad), bad
    assert fc.state() == "Running"

    reply = fc.ok("PUT", "/snapshot/fork", body)
    assert isinstance(reply, dict) and set(reply) == {"pid"}
    forked.append(reply["pid"])
    child = Api(tmp_path / "child.sock")
    info = fc.ok("GET", "/")
    assert isinstance(info, dict) and child.ok("GET", "/") == {**info, "state": "Running"}   # id "fleet-7"
    config = child.ok("GET", "/vm/config")
    assert isinstance(config, dict) and config["drives"][0]["path_on_host"] == str(own)
    child.ok("PATCH", "/vm", {"state": "Paused"})
    assert child.state() == "Paused" and fc.state() == "Running"
    child.ok("PATCH", "/vm", {"state": "Resumed"})
    # The guest's program waits on in both; each hears its own Ctrl-Alt-Del.
    child.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    _wait_file_line(tmp_path / "child.out", "probe: ctrl-alt-del")
    wait_gone(reply["pid"])
    assert not (tmp_path / "child.sock").exists()
    assert (tmp_path / "child.log").exists()

    # A child forks in turn, into one with an API of its own too.
    reply = fc.ok("PUT", "/snapshot/fork", child_body("child2", own))
    assert isinstance(reply, dict)
    forked.append(reply["pid"])
    child = Api(tmp_path / "child2.sock")
    (tmp_path / "child3.ext4").write_bytes(b"the grandchild's root".ljust(1 << 20, b"\0"))
    body3 = child_body("child3", tmp_path / "child3.ext4")
    reply3 = child.ok("PUT", "/snapshot/fork", body3)
    assert isinstance(reply3, dict)
    forked.append(reply3["pid"])
    grandchild = Api(tmp_path / "child3.sock")
    assert grandchild.state() == "Running"
    grandchild.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    _wait_file_line(tmp_path / "child3.out", "probe: ctrl-alt-del")
    wait_gone(reply3["pid"])
    os.kill(reply["pid"], signal.SIGTERM)
    wait_gone(reply["pid"])

    assert fc.state() == "Running"
    fc.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    fc.vm.wait_line("probe: ctrl-alt-del")
    assert fc.vm.finish()[0] == 0
    # Its own, once: the children's serial output went to their files.
    assert [line for line in fc.vm.seen if line.startswith("probe: ctrl-alt-del")] == ["probe: ctrl-alt-del"]


@needs_xs_utils
def test_a_vm_with_a_xenstore_forks_with_a_copy_of_it(probe: Path, tmp_path: Path, vms: list[Vm],
                                                     forked: list[int]) -> None:
    """The child's XenStore starts as the parent's was, on a socket of its own (Debian's
    xenstore-utils on both); from then on each store's writes are its own."""
    parent_xs, child_xs = tmp_path / "parent.xs", tmp_path / "child.xs"
    parent = Guest(vms, ["-kernel", str(probe / "probe.elf"), "-append", "probe.run=idle", "-serial",
                         "stdio", "-xenstore", str(parent_xs), "-xen-domid", "7"], tmp_path / "parent.qmp",
                   ready=False)
    parent.vm.wait_line("probe: idle")
    xs_tool(parent_xs, "xenstore-write", "/vm/name", "web-1")
    child_qmp = str(tmp_path / "child.qmp")
    assert parent.error("vm-fork", **{"api-channel": child_qmp}) == (
        "xenstore: give the child a socket of its own (its store starts as a copy)")
    assert parent.error("vm-fork", **{"api-channel": child_qmp, "xenstore": str(parent_xs)}) == (
        f"xenstore: {parent_xs} is the parent's; give the child a socket of its own")
    pid = parent.cmd("vm-fork", **{"api-channel": child_qmp, "xenstore": str(child_xs)})["pid"]
    forked.append(pid)
    assert xs_tool(child_xs, "xenstore-read", "/vm/name").stdout == "web-1\n"
    xs_tool(child_xs, "xenstore-write", "/vm/name", "web-2")
    xs_tool(parent_xs, "xenstore-write", "/vm/ip", "10.0.0.2")
    assert xs_tool(parent_xs, "xenstore-read", "/vm/name").stdout == "web-1\n"
    assert xs_tool(child_xs, "xenstore-read", "/vm/ip", check=False).returncode == 1
    child = Child(pid, Path(child_qmp), None)
    assert child.cmd("xenstore-read", path="/vm/name") == {"value": "web-2"}
    child.quit()
    assert not child_xs.exists() and parent_xs.exists()
    parent.quit()
