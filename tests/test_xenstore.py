"""The VMM's XenStore socket, driven by real clients (Debian xenstore-utils, PyPI pyxs) and
by raw wire messages: framing, errors and limits (the fuzzing flood it must survive is in
test_xenstore_fuzz.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PROBE_KERNEL, Vm, needs_kvm, run_altovirt

HEADER = struct.Struct("=IIII")
DOMID = 7
needs_xs_utils = pytest.mark.skipif(
    shutil.which("xenstore-read") is None,
    reason="SKIPPED LOUDLY: Debian xenstore-utils is missing (scripts/setup installs it)")


class Wire:
    """A raw XenStore connection."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(path))

    def send(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.s.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)

    def recv(self) -> tuple[int, int, int, bytes]:
        head = self._exactly(HEADER.size)
        op, req_id, tx_id, length = HEADER.unpack(head)
        return op, req_id, tx_id, self._exactly(length)

    def call(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> tuple[int, bytes]:
        self.send(op, payload, req_id, tx_id)
        while True:
            rop, rid, _, body = self.recv()
            if rop != 15:                                     # skip watch events
                assert rid == req_id
                return rop, body

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def close(self) -> None:
        self.s.close()


@pytest.fixture(scope="module")
def xs(probe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running VM's XenStore socket (the guest is domain 7)."""
    sock = tmp_path_factory.mktemp("xs") / "xenstore.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            "-xenstore", str(sock), "-xen-domid", str(DOMID))
    vm.wait_line("probe: waiting")
    yield sock
    vm.proc.terminate()
    assert vm.finish()[0] == 143
    assert not sock.exists()                                     # removed at exit


def tool(sock: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=str(sock))
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30, check=check)


@needs_kvm
@needs_xs_utils
def test_xenstore_utils(xs: Path) -> None:
    tool(xs, "xenstore-write", "/vm/name", "web-1", "/vm/ip", "10.0.0.2")     # one transaction
    assert tool(xs, "xenstore-read", "/vm/name", "/vm/ip").stdout == "web-1\n10.0.0.2\n"
    assert tool(xs, "xenstore-list", "/vm").stdout == "ip\nname\n"
    assert tool(xs, "xenstore-exists", "/vm/ip").returncode == 0
    assert tool(xs, "xenstore-exists", "/vm/nope", check=False).returncode == 1
    tool(xs, "xenstore-chmod", "/vm/ip", "n0", f"r{DOMID}")
    assert "/vm/ip = \"10.0.0.2\"" in tool(xs, "xenstore-ls", "-f", "-p", "/vm").stdout
    assert f"(n0,r{DOMID})" in tool(xs, "xenstore-ls", "-p", "/vm").stdout
    assert f"{DOMID} = \"\"" in tool(xs, "xenstore-ls", "/local/domain").stdout
    watcher = subprocess.Popen(["xenstore-watch", "-n", "3", "/vm"], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, XENSTORED_PATH=str(xs)))
    time.sleep(0.3)
    tool(xs, "xenstore-write", "/vm/state", "ready")
    tool(xs, "xenstore-rm", "/vm")
    out, _ = watcher.communicate(timeout=30)
    assert out.split() == ["/vm", "/vm/state", "/vm"]
    assert tool(xs, "xenstore-read", "/vm/name", check=False).returncode == 1
    # More children than one reply holds: libxenstore falls back to DIRECTORY_PART.
    names = [f"/big/child-with-a-fairly-long-name-{i:04d}" for i in range(300)]
    tool(xs, "xenstore-write", *[x for n in names for x in (n, "v")])
    assert tool(xs, "xenstore-list", "/big").stdout.split() == sorted(n.rsplit("/", 1)[1] for n in names)
    tool(xs, "xenstore-rm", "/big")


@needs_kvm
def test_pyxs(xs: Path) -> None:
    from pyxs import Client, PyXSError  # type: ignore[import-untyped]
    with Client(unix_socket_path=str(xs)) as c, Client(unix_socket_path=str(xs)) as other:
        monitor = c.monitor()
        monitor.watch(b"/py", b"token")
        events = monitor.wait()
        assert next(events) == (b"/py", b"token")
        other.write(b"/py/a", b"1")
        assert next(events) == (b"/py/a", b"token")
        assert c.read(b"/py/a") == b"1"
        assert c.get_domain_path(DOMID) == f"/local/domain/{DOMID}".encode()
        assert c.is_domain_introduced(DOMID) and not c.is_domain_introduced(DOMID + 1)
        c.set_perms(b"/py/a", [b"b0", b"r3"])
        assert c.get_perms(b"/py/a") == [b"b0", b"r3"]
        assert next(events) == (b"/py/a", b"token")                # re-permissioned
        c.transaction()
        c.write(b"/py/b", b"2")
        assert other.exists(b"/py/b") is False                 # isolated until commit
        assert c.commit() is True
        assert next(events) == (b"/py/b", b"token")
        with pytest.raises(PyXSError):
            c.read(b"/py/missing")
        c.delete(b"/py")
        assert next(events) == (b"/py", b"token")


@needs_kvm
@needs_xs_utils
def test_guest_over_vsock(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """The probe's XenStore client on the vsock port: domain 7, with its permissions and quotas."""
    sock = tmp_path / "xs.sock"
    vm = Vm("-kernel", str(probe / PROBE_KERNEL), "-append", "probe.run=xenstore,wait", "-serial", "stdio",
            "-device", f"vsock,id=vsock0,guest-cid=3,uds-path={tmp_path / 'v.sock'}",
            "-xenstore", str(sock), "-xen-domid", str(DOMID))
    vms.append(vm)
    home = f"/local/domain/{DOMID}"
    vm.wait_line("probe: xenstore watching")
    tool(sock, "xenstore-write", "/vm/secret", "host only", f"{home}/config/name", "probe-vm")
    # The host learns the guest's state by watching its key (initial event, then the write).
    watcher = subprocess.Popen(["xenstore-watch", "-n", "2", f"{home}/data/hello"], stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, XENSTORED_PATH=str(sock)))
    time.sleep(0.3)
    tool(sock, "xenstore-write", f"{home}/config/ready", "1")
    vm.wait_line("probe: waiting", timeout=120)
    assert "probe: test xenstore ok" in vm.seen
    assert watcher.communicate(timeout=30)[0].split() == [f"{home}/data/hello"] * 2
    for line in (
            "probe: xenstore event path=config/ready",          # relative watch, relative event
            "probe: xenstore read config/name=probe-vm",
            "probe: xenstore write data/hello=OK",
            "probe: xenstore read /vm/secret=EACCES",
            "probe: xenstore write /vm/ours=EACCES",
            "probe: xenstore write /local/domain/0/x=EACCES",
            "probe: xenstore transaction reads counter=0",      # isolated from the write made after its start
            "probe: xenstore transaction first=EAGAIN tries=2 end=OK counter=11",
            "probe: xenstore write 2049 bytes=ENOSPC",
            "probe: xenstore write 2048 bytes=OK",
            # 1000 nodes: home, config, config/{name,ready}, data, data/hello, counter and q are 8.
            "probe: xenstore quota nodes=992 then=ENOSPC",
            "probe: xenstore after rm=OK"):
        assert line in vm.seen
    written = tool(sock, "xenstore-read", f"{home}/data/hello", f"{home}/counter").stdout
    assert written == "from the guest\n11\n"
    assert tool(sock, "xenstore-list", f"{home}/q").stdout == "again\n"
    listing = " ".join(tool(sock, "xenstore-ls", "-f", "-p", home).stdout.split())
    assert f'{home}/data/hello = "from the guest" (n{DOMID})' in listing     # the guest owns what it made
    assert tool(sock, "xenstore-read", "/vm/secret").stdout == "host only\n"
    vm.proc.terminate()
    assert vm.finish()[0] == 143


@needs_kvm
def test_qmp_commands(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """xenstore-* over QMP (qemu.qmp) act as dom0: what they write is the store's, watchers on
    the host socket hear of it, and every refusal is a GenericError that changes nothing."""
    from pyxs import Client
    from qemu.qmp import ExecuteError, QMPClient

    sock, api = tmp_path / "xs.sock", tmp_path / "qmp.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            "-api-channel", f"unix:{api}", "-xenstore", str(sock), "-xen-domid", str(DOMID))
    vms.append(vm)
    vm.wait_line("probe: waiting")
    home = f"/local/domain/{DOMID}"

    async def session() -> dict[str, object]:
        qmp = QMPClient("xs")
        await qmp.connect(str(api))
        seen: dict[str, object] = {}

        async def error(cmd: str, args: dict[str, object]) -> str:
            with pytest.raises(ExecuteError) as e:
                await qmp.execute(cmd, args)
            assert e.value.error_class == "GenericError"
            return str(e.value)

        with Client(unix_socket_path=str(sock)) as c:
            monitor = c.monitor()
            monitor.watch(b"/vm", b"t")
            events = monitor.wait()
            assert next(events) == (b"/vm", b"t")
            await qmp.execute("xenstore-write", {"path": "/vm/name", "value": "web-1 \u00e9"})
            assert next(events) == (b"/vm/name", b"t")
            assert c.read(b"/vm/name") == "web-1 \u00e9".encode()
            await qmp.execute("xenstore-write", {"path": "/vm/blob", "value": "AP8=", "format": "base64"})
            assert c.read(b"/vm/blob") == b"\x00\xff"
            c.write(b"/vm/ip", b"10.0.0.2")
        seen["read"] = await qmp.execute("xenstore-read", {"path": "/vm/name"})
        seen["blob"] = await qmp.execute("xenstore-read", {"path": "/vm/blob", "format": "base64"})
        seen["list"] = await qmp.execute("xenstore-list", {"path": "/vm"})
        seen["home"] = await qmp.execute("xenstore-get-perms", {"path": home})
        await qmp.execute("xenstore-set-perms", {"path": "/vm/ip", "perms": ["n0", f"r{DOMID}"]})
        seen["perms"] = await qmp.execute("xenstore-get-perms", {"path": "/vm/ip"})
        seen["errors"] = [
            await error("xenstore-read", {"path": "/vm/missing"}),
            await error("xenstore-read", {"path": "/vm/blob"}),
            await error("xenstore-read", {"path": "/vm", "format": "hex"}),
            await error("xenstore-write", {"path": "bad//path", "value": ""}),
            await error("xenstore-write", {"path": "/vm/x", "value": "!", "format": "base64"}),
            await error("xenstore-write", {"path": "/vm/x", "value": "x" * 4096}),
            await error("xenstore-write", {"path": "/vm/x"}),
            await error("xenstore-rm", {"path": "/"}),
            await error("xenstore-list", {"path": "/nowhere/below"}),
            await error("xenstore-set-perms", {"path": "/vm/ip", "perms": []}),
            await error("xenstore-set-perms", {"path": "/vm/ip", "perms": ["x1"]}),
            await error("xenstore-set-perms", {"path": "/vm/ip", "perms": [7]}),
        ]
        await qmp.execute("xenstore-rm", {"path": "/vm/blob"})
        seen["after"] = await qmp.execute("xenstore-list", {"path": "/vm"})
        seen["unchanged"] = await qmp.execute("xenstore-get-perms", {"path": "/vm/ip"})
        await qmp.execute("quit")
        with contextlib.suppress(EOFError):     # the VMM may have closed the socket first
            await qmp.disconnect()
        return seen

    seen = asyncio.run(session())
    assert seen["read"] == {"value": "web-1 \u00e9"}
    assert seen["blob"] == {"value": "AP8="}
    assert seen["list"] == ["blob", "ip", "name"]
    assert seen["home"] == [f"n{DOMID}"]
    assert seen["perms"] == ["n0", f"r{DOMID}"]
    assert seen["errors"] == [
        "/vm/missing: ENOENT (No such file or directory)",
        "the value is not UTF-8; read it with format 'base64'",
        "Parameter 'format' expects one of utf8, base64",
        "bad//path: EINVAL (Invalid argument)",
        "Parameter 'value' is not valid base64",
        "/vm/x: the path and value are over 4096 bytes",
        "Parameter 'value' is missing",
        "/: EINVAL (Invalid argument)",
        "/nowhere/below: ENOENT (No such file or directory)",
        *["Parameter 'perms' expects a non-empty list like [\"n0\", \"r7\"]: n (none), r, w or b (both), "
          "then a domain id"] * 3,
    ]
    assert seen["after"] == ["ip", "name"]
    assert seen["unchanged"] == ["n0", f"r{DOMID}"]
    assert vm.finish()[0] == 0


@needs_kvm
def test_wire_edges(xs: Path) -> None:
    w = Wire(xs)
    w.call(11, b"/edge/v\0value")
    # Several requests in one send, and one request split over sends, with ids echoed.
    w.s.sendall(HEADER.pack(2, 41, 0, 8) + b"/edge/v\0" + HEADER.pack(1, 42, 0, 6) + b"/edge\0")
    assert w.recv() == (2, 41, 0, b"value") and w.recv() == (1, 42, 0, b"v\0")
    msg = HEADER.pack(2, 43, 0, 8) + b"/edge/v\0"
    w.s.sendall(msg[:5])
    time.sleep(0.05)
    w.s.sendall(msg[5:])
    assert w.recv() == (2, 43, 0, b"value")
    assert w.call(2, b"/edge/v") == (16, b"EINVAL\0")            # no NUL
    assert w.call(2, b"/edge/v\0x\0") == (16, b"EINVAL\0")       # one string too many
    assert w.call(2, b"/nope\0") == (16, b"ENOENT\0")
    assert w.call(2, b"/edge/v\0", tx_id=12345) == (16, b"ENOENT\0")
    for op in (0, 8, 9, 15, 16, 18, 19, 20, 23, 999):
        assert w.call(op, b"x\0") == (16, b"ENOSYS\0"), op
    assert w.call(10, b"12\0") == (10, b"/local/domain/12\0")
    assert w.call(6, b"\0")[0] == 6
    w.send(2, b"x" * 4097)                                     # over the payload limit
    with pytest.raises((EOFError, ConnectionResetError)):
        w.recv()
    w.close()
    ok = Wire(xs)                                               # the store serves on
    assert ok.call(2, b"/edge/v\0") == (2, b"value")
    ok.close()


def test_config_errors(probe: Path, tmp_path: Path) -> None:
    kernel = str(probe / "probe.elf")
    taken = tmp_path / "taken"
    taken.write_text("")
    for args, message in [
        (("-xenstore", str(taken)), f"-xenstore: {taken} already exists; it must not exist before start"),
        (("-xenstore", str(tmp_path / "x.sock"), "-xen-domid", "0"), "-xen-domid"),
        (("-xen-domid", "32752"), "-xen-domid"),
    ]:
        r = run_altovirt("-kernel", kernel, *args)
        assert r.returncode == 2 and r.stderr.startswith("altovirt: error: "), r.stderr
        assert message in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.timeout(60)
def test_clients_leaving_while_watches_fire_hang_nothing(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """XenStore clients with a watch come and go while QMP writes under the watched path: every
    write is answered. (A write fires the watches under the store's lock and queues each event
    under the socket server's; a client leaving took the two the other way round, and about one
    run in twenty of test_qmp_commands hung there for good.)"""
    from pyxs import Client
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, api = tmp_path / "xs.sock", tmp_path / "qmp.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            "-api-channel", f"unix:{api}", "-xenstore", str(sock), "-xen-domid", str(DOMID))
    vms.append(vm)
    vm.wait_line("probe: waiting")
    qmp = QEMUMonitorProtocol(str(api))
    qmp.connect()
    qmp.settimeout(10)                  # a write that hangs fails the test instead of hanging it
    stop = False

    def writes() -> int:
        n = 0
        while not stop:
            assert qmp.cmd_obj({"execute": "xenstore-write",
                                "arguments": {"path": f"/vm/n{n % 8}", "value": str(n)}}) == {"return": {}}
            n += 1
        return n

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        writer = pool.submit(writes)
        for _ in range(200):
            with Client(unix_socket_path=str(sock)) as c:
                c.monitor().watch(b"/vm", b"t")
        stop = True
        assert writer.result(timeout=30) > 0
    qmp.cmd_obj({"execute": "quit"})
    qmp.close()
    assert vm.finish()[0] == 0
