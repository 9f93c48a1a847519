"""A property-based flood: thousands of random and mutated QMP requests at a running VM,
which must answer each complete request with a well-formed reply and keep running."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt.api.qmp import Command, QmpError, _check_args

from .conftest import Vm, needs_kvm

T = TypeVar("T")

pytestmark = needs_kvm

COMMANDS = ["qmp_capabilities", "stop", "cont", "system_powerdown", "query-status", "query-cpus",
            "query-cpus-fast", "query-hotpluggable-cpus", "query-version", "query-name", "query-uuid",
            "query-commands",
            "no-such-command", "", "QUERY-STATUS"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(COMMANDS) | json_values},
    optional={"arguments": json_values, "id": json_values, "extra": json_values})
# Hot-plug requests close to valid ones, on real image files ("@DIR@" is the VM's
# directory), so that slots really fill and empty in every order.
ids = st.sampled_from(["d0", "d1", "n0", "rootfs", ""]) | st.text(max_size=6)
files = st.sampled_from(["@DIR@/a.img", "@DIR@/b.img", "@DIR@/missing", "/dev/null"])
addrs = st.sampled_from(["0x0", "0x1", "0x5", "0x6", "7", "x"]) | st.integers(-2, 8)


def command(name: str, required: dict, optional: dict | None = None) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({"execute": st.just(name),
                                  "arguments": st.fixed_dictionaries(required, optional=optional or {})})


hotplug_requests = st.one_of(
    command("blockdev-add", {"node-name": ids, "file": st.fixed_dictionaries(
        {"filename": files}, optional={"driver": st.sampled_from(["file", "host_device", "raw"]),
                                       "aio": st.sampled_from(["native", "threads", "x"])})},
        {"read-only": st.booleans(), "cache": st.fixed_dictionaries({}, optional={"direct": st.booleans()})}),
    command("device_add", {"id": ids, "driver": st.sampled_from(["virtio-blk-mmio", "virtio-net-mmio", "x"])},
            {"addr": addrs, "lun": st.integers(-1, 6), "serial": st.text(max_size=24), "drive": ids,
             "romfile": st.sampled_from(["", "efi.rom"])}),
    command("device_del", {"id": ids}),
    command("blockdev-del", {"node-name": ids}),
    command("netdev_add", {"id": ids}, {"ifname": st.sampled_from(["lo", "nosuch0"]), "fd": ids}),
    command("netdev_del", {"id": ids}),
    command("getfd", {"fdname": ids}),
    command("system_reset", {}))
# Raw input: arbitrary bytes, and real requests cut short or with bytes flipped.
mutated = st.tuples(requests, st.integers(0, 200), st.binary(max_size=8)).map(
    lambda t: json.dumps(t[0]).encode()[:t[1]] + t[2])
raw_input = st.binary(max_size=300) | mutated


ARG_PARAMS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "id": (str, True), "addr": ((str, int), False), "on": (bool, False), "fd": (str, True)}
ARG_TYPES = {"id": "string", "addr": "string/int", "on": "bool", "fd": "string"}


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "addr", "on", "fd", "x", "y"]), json_values, max_size=5))
def test_argument_errors_name_the_first_bad_key(args: dict) -> None:
    """Whatever the arguments, the error names the first one, in the order given, that is
    unknown or of another JSON type (decoded JSON has exact types: true is no int), else the
    first required one absent, in QEMU's words; arguments without fault pass."""
    def fits(key: str, value: object) -> bool:
        types = ARG_PARAMS[key][0]
        return type(value) in (types if isinstance(types, tuple) else (types,))

    bad = [k for k, v in args.items() if k not in ARG_PARAMS or not fits(k, v)]
    missing = [k for k, (_, required) in ARG_PARAMS.items() if required and k not in args]
    try:
        _check_args(Command(lambda a: {}, ARG_PARAMS), args)
        desc = None
    except QmpError as e:
        desc = e.desc
    if bad and bad[0] not in ARG_PARAMS:
        assert desc == f"Parameter '{bad[0]}' is unexpected"
    elif bad:
        assert desc == f"Invalid parameter type for '{bad[0]}', expected: {ARG_TYPES[bad[0]]}"
    elif missing:
        assert desc == f"Parameter '{missing[0]}' is missing"
    else:
        assert desc is None


@pytest.fixture
def running(probe: Path, tmp_path: Path) -> Iterator[tuple[Vm, Path]]:
    """A VM of its own for each test, so that no test depends on another having run."""
    sock = tmp_path / "qmp.sock"
    for name in ("a.img", "b.img", "root.img"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=wait", "-serial", "stdio",
            "-drive", f"id=rootfs,file={tmp_path / 'root.img'}", "-api-channel", f"unix:{sock}")
    vm.wait_line("probe: waiting")
    yield vm, sock
    if vm.proc.poll() is None:
        vm.proc.kill()
        vm.proc.wait()


def connect(sock: Path) -> tuple[socket.socket, BinaryIO]:
    """A raw connection, negotiated, for requests qemu.qmp would not send (ids of any JSON
    type, anything at all as the command) and bytes that are no request at all."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    s.sendall(b'{"execute": "qmp_capabilities"}')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def read_reply(f: BinaryIO) -> dict:
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


def monitor(sock: Path) -> QEMUMonitorProtocol:
    """qemu.qmp's client, connected and negotiated, for well-formed commands."""
    mon = QEMUMonitorProtocol(str(sock))
    mon.settimeout(10)
    mon.connect()
    return mon


def hang_up(mon: QEMUMonitorProtocol) -> None:
    with contextlib.suppress(EOFError):     # qemu.qmp reports a close the server made first (quit)
        mon.close()


def survived(vm: Vm, sock: Path) -> None:
    """After a flood of requests: the VMM answers, its guest still runs, and quit ends it cleanly."""
    assert vm.proc.poll() is None
    mon = monitor(sock)
    try:
        if mon.cmd_obj({"execute": "query-status"})["return"]["status"] == "paused":   # a fuzzed "stop"
            assert mon.cmd_obj({"execute": "cont"}) == {"return": {}}
        tid = mon.cmd_obj({"execute": "query-cpus"})["return"][0]["thread_id"]

        def cpu_time() -> int:
            with open(f"/proc/{vm.proc.pid}/task/{tid}/stat") as st_file:
                fields = st_file.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])

        before = cpu_time()
        time.sleep(0.5)
        assert cpu_time() > before                      # the guest still runs
        assert mon.cmd_obj({"execute": "quit"}) == {"return": {}}
    finally:
        hang_up(mon)
    assert vm.finish()[0] == 0 and not sock.exists()


def fuzz(running: tuple[Vm, Path], examples: int, inputs: st.SearchStrategy[T],
         check: Callable[[Path, T], None]) -> None:
    """``check(socket, input)`` for ``examples`` inputs against one VM, which must then be
    alive and well (:func:`survived`)."""
    vm, sock = running
    settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))(
        given(inputs)(lambda value: check(sock, value)))()
    survived(vm, sock)


def test_structured_requests_get_one_wellformed_reply(running: tuple[Vm, Path]) -> None:
    def check(sock: Path, request: dict) -> None:
        s, f = connect(sock)        # raw: ids of any JSON type and any "execute", which qemu.qmp refuses
        try:
            s.sendall(json.dumps(request).encode())
            reply = read_reply(f)
            assert set(reply) - {"id"} in ({"return"}, {"error"})
            if "error" in reply:
                assert set(reply["error"]) == {"class", "desc"} and isinstance(reply["error"]["desc"], str)
            if "id" in request:
                assert reply["id"] == request["id"]
        finally:
            s.close()

    fuzz(running, 1500, requests, check)


def test_hotplug_requests_get_one_wellformed_reply(running: tuple[Vm, Path]) -> None:
    def check(sock: Path, request: dict) -> None:
        mon = monitor(sock)
        try:
            reply = mon.cmd_obj(json.loads(json.dumps(request).replace("@DIR@", str(sock.parent))))
            assert set(reply) in ({"return"}, {"error"}), reply
            if "error" in reply:
                assert reply["error"]["class"] in ("GenericError", "DeviceNotFound"), reply
        finally:
            hang_up(mon)

    fuzz(running, 600, hotplug_requests, check)


def test_raw_garbage_never_hurts(running: tuple[Vm, Path]) -> None:
    """Whatever bytes a client sends, the next client is served as if nothing happened."""
    def check(sock: Path, data: bytes) -> None:
        s, _ = connect(sock)                        # raw: these bytes are no client's
        with contextlib.suppress(OSError):          # the server may hang up on garbage
            s.sendall(data)
        s.close()
        mon = monitor(sock)
        try:
            assert mon.cmd_obj({"execute": "query-version", "id": "7"})["id"] == "7"
        finally:
            hang_up(mon)

    fuzz(running, 1500, raw_input, check)
