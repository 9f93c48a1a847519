"""QMP commands, mapped onto the VMM's lifecycle and queries.

Replies follow QEMU's and StratoVirt's shapes exactly (see the spec's
QMP section); a command that makes no sense in the VM's current state gets
a GenericError and changes nothing.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .. import __version__, arch
from ..backends import BackendError
from ..config import ConfigError
from ..config.devices import AIO_MODES
from ..config.keys import KeyProblem, Problem
from ..config.validate import check_id, check_mac, check_tap
from ..devices.legacy.vmgenid import guid_string
from ..errors import EXIT_USAGE
from ..memory import PAGE_SHIFT
from ..sandbox import seccomp
from ..vmm.actions import (
    Action,
    AddBlockdev,
    AddDisk,
    AddNetdev,
    AddNic,
    DelBlockdev,
    DelDevice,
    DelNetdev,
    Pause,
    Powerdown,
    QueryBalloon,
    QueryVcpus,
    Reset,
    Resume,
    SetBalloon,
)
from ..vmm.hotplug import HotplugError, NoSuchDevice
from ..vmm.lifecycle import StateError
from ..vmm.machine import Machine, VcpuInfo, VmmError
from ..vmm.vcpu import StopReason
from .qmp import Command, QmpError, QmpServer, argument_error, check_arguments
from .xenstore import xenstore_commands

HOST_QMP_QUIT = StopReason("host-qmp-quit", False, 0)
NO_UUID = "00000000-0000-0000-0000-000000000000"       # QEMU's answer without -uuid
BLOCK_DRIVERS = ("virtio-blk-mmio", "virtio-blk-device")
NET_DRIVERS = ("virtio-net-mmio", "virtio-net-device")
# On a PCI machine, into a root port (bus=): QEMU's and StratoVirt 2.x's names.
PCI_BLOCK_DRIVERS, PCI_NET_DRIVERS = ("virtio-blk-pci",), ("virtio-net-pci",)

T = TypeVar("T")


# The QEMU release whose QMP the commands follow, as StratoVirt 2.x reports it: clients such as
# Kata's govmm refuse a server below QEMU 5.
QEMU_VERSION = {"major": 5, "minor": 0, "micro": 1}
# blockdev-add's file drivers: an image file, or a host block device (Kata's choice for one).
FILE_DRIVERS = ("file", "host_device")


def version() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": f"altovirt-{__version__}"}


def _answer(action: Callable[[], T]) -> T:
    """What a lifecycle or hot-plug action returns; its refusals become QMP errors."""
    try:
        return action()
    except (HotplugError, StateError, ConfigError) as e:
        raise QmpError("DeviceNotFound" if isinstance(e, NoSuchDevice) else "GenericError", str(e)) from e


def _checked(action: Callable[[], object]) -> object:
    """Run an action for its effect: the reply is an empty return, or the QMP error."""
    _answer(action)
    return {}


def _ask(machine: Machine, action: Callable[[dict[str, Any]], Action]) -> Callable[[dict[str, Any]], object]:
    """A command that asks the VMM for the action ``action(args)`` makes (carried out on the
    VMM's thread); its reply is empty."""
    return lambda args: _checked(lambda: machine.request(action(args)))


def _object(name: str, value: dict[str, Any], fields: dict[str, type]) -> None:
    """Check a nested argument object (QMP's 'file', 'cache'), whose keys are all optional,
    as the arguments themselves are checked (QmpError naming ``name.key``)."""
    check_arguments({key: (types, False) for key, types in fields.items()}, value, f"{name}.")


def _slot(args: dict[str, Any]) -> int | None:
    """The slot ``addr`` (0x0 is vda or eth0) or ``lun`` (0 is vdb) names; None for any."""
    if "addr" in args and "lun" in args:
        raise QmpError("GenericError", "give addr or lun, not both")
    if "lun" in args:
        if args["lun"] < 0:
            raise QmpError("GenericError", f"Invalid lun {args['lun']}; expected 0 (vdb) or more")
        return int(args["lun"]) + 1
    if "addr" not in args:
        return None
    addr = args["addr"]
    try:
        return addr if isinstance(addr, int) else int(addr, 0)
    except ValueError as e:
        raise QmpError("GenericError", f"Invalid addr {addr!r}; expected a slot number like 0x1") from e


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def hotplug_commands(machine: Machine, fds: dict[str, int]) -> dict[str, Command]:
    """blockdev-add/del, netdev_add/del, device_add/del and getfd/closefd. ``fds``: getfd's
    named descriptors, until netdev_add takes one (the QMP server's, which closes the rest)."""

    def blockdev_add(args: dict[str, Any]) -> object:
        node, file = args["node-name"], args["file"]
        _object("file", file, {"driver": str, "filename": str, "aio": str})
        _object("cache", args.get("cache", {}), {"direct": bool, "no-flush": bool})
        if file.get("driver", "file") not in FILE_DRIVERS or args.get("driver", "raw") not in ("raw", "file"):
            raise QmpError("GenericError", "only raw images on the 'file' or 'host_device' driver "
                                           "are supported")
        if "filename" not in file:
            raise argument_error(KeyProblem(Problem.MISSING, "filename"), "file.")
        if file.get("aio", "off") not in AIO_MODES:
            raise QmpError("GenericError", f"Parameter 'file.aio' expects one of {', '.join(AIO_MODES)}")
        if file.get("driver") == "host_device" and not _is_block_device(file["filename"]):
            raise QmpError("GenericError", f"'host_device' driver requires '{file['filename']}' "
                                           "to be a block device")
        if args.get("cache", {}).get("no-flush"):
            raise QmpError("GenericError", "cache.no-flush is not supported: a flush is always durable")
        return _checked(lambda: machine.request(AddBlockdev(
            check_id("node-name", node), args["file"]["filename"],
            args.get("read-only", False), args.get("cache", {}).get("direct", False))))

    def netdev_add(args: dict[str, Any]) -> object:
        name = args["id"]
        if args.get("type", "tap") != "tap":
            raise QmpError("GenericError", "only netdevs of type 'tap' are supported")
        if ("ifname" in args) == ("fd" in args):
            raise QmpError("GenericError", "give the tap as ifname or as fd (from getfd), one of them")
        if "ifname" in args:
            ifname = args["ifname"]
            return _checked(lambda: machine.request(AddNetdev(check_id("id", name),
                                                              ifname=check_tap("ifname", ifname))))
        fdname = args["fd"]
        if fdname not in fds:
            raise QmpError("GenericError", f"File descriptor named '{fdname}' has not been found")
        result = _checked(lambda: machine.request(AddNetdev(check_id("id", name), fd=fds[fdname])))
        del fds[fdname]                 # the tap owns it now
        return result

    def device_add(args: dict[str, Any]) -> object:
        name, driver, slot, bus = args["id"], args["driver"], _slot(args), args.get("bus")
        pci = machine.cfg.pci
        blk, net = (PCI_BLOCK_DRIVERS, PCI_NET_DRIVERS) if pci else (BLOCK_DRIVERS, NET_DRIVERS)
        if driver not in blk + net:
            raise QmpError("GenericError", f"Parameter 'driver' expects one of {', '.join(blk + net)}"
                                           + (" (a PCI machine)" if pci else ""))
        if args.get("drive", name) != name:
            raise QmpError("GenericError", f"Parameter 'drive' must equal 'id' ({name!r}): a device "
                                           "takes the block node of its own name")
        if args.get("romfile"):
            raise QmpError("GenericError", f"Parameter 'romfile': {driver} has no option ROM")
        if pci:
            if bus is None or bus == "pcie.0":
                raise QmpError("GenericError", "Bus 'pcie.0' does not support hotplugging; give bus= "
                                               "a pcie-root-port's id")
            if slot not in (None, 0) or "lun" in args:
                given = args.get("addr", args.get("lun"))
                raise QmpError("GenericError", f"Parameter 'addr': a root port's slot holds device 0 "
                                               f"only; give 0x0 or none, not {given!r}")
        elif bus is not None:
            raise QmpError("GenericError", f"Bus '{bus}' not found: a virtio-mmio machine has no buses "
                                           "(-machine q35 has root ports)")
        if driver in blk:
            if "mac" in args:
                raise QmpError("GenericError", f"Parameter 'mac' is unexpected for {driver}")
            return _checked(lambda: machine.request(AddDisk(name, slot, args.get("serial"), bus)))
        if "serial" in args:
            raise QmpError("GenericError", f"Parameter 'serial' is unexpected for {driver}")
        mac = check_mac("mac", args["mac"]) if args.get("mac") else None
        return _checked(lambda: machine.request(AddNic(name, slot, mac, bus)))

    def getfd(args: dict[str, Any], fd: int) -> object:
        name = args["fdname"]
        if name[:1].isdigit():
            raise QmpError("GenericError", "Parameter 'fdname' may not start with a digit")
        if name in fds:
            os.close(fds[name])         # QEMU replaces a descriptor of the same name
        fds[name] = fd
        return {}

    def closefd(args: dict[str, Any]) -> object:
        fd = fds.pop(args["fdname"], None)
        if fd is None:
            raise QmpError("GenericError", f"File descriptor named '{args['fdname']}' not found")
        os.close(fd)
        return {}

    return {
        "blockdev-add": Command(blockdev_add, {"node-name": (str, True), "driver": (str, False),
                                               "file": (dict, True), "cache": (dict, False),
                                               "read-only": (bool, False)}),
        "blockdev-del": Command(_ask(machine, lambda a: DelBlockdev(a["node-name"])),
                                {"node-name": (str, True)}),
        "netdev_add": Command(netdev_add, {"id": (str, True), "type": (str, False), "ifname": (str, False),
                                           "fd": (str, False)}),
        "netdev_del": Command(_ask(machine, lambda a: DelNetdev(a["id"])), {"id": (str, True)}),
        "device_add": Command(device_add, {"id": (str, True), "driver": (str, True),
                                           "addr": ((str, int), False), "lun": (int, False),
                                           "mac": (str, False), "serial": (str, False),
                                           "drive": (str, False), "romfile": (str, False),
                                           "bus": (str, False)}),
        "device_del": Command(_ask(machine, lambda a: DelDevice(a["id"])), {"id": (str, True)}),
        "getfd": Command(getfd, {"fdname": (str, True)}, takes_fd=True),
        "closefd": Command(closefd, {"fdname": (str, True)}),
    }


# How QEMU names this machine's CPUs: query-cpus' "arch", query-cpus-fast's "target" and the
# type query-hotpluggable-cpus gives a -cpu host vCPU.
CPU_ARCH = {"x86_64": "x86", "aarch64": "arm"}[arch.MACHINE]
CPU_TYPE = {"x86_64": "host-x86-cpu", "aarch64": "host-arm-cpu"}[arch.MACHINE]


def build(machine: Machine, fds: dict[str, int]) -> dict[str, Command]:
    """The command table for ``machine``; ``fds`` keeps getfd's descriptors (see QmpServer)."""

    def query_status(args: dict[str, Any]) -> object:
        state = machine.state.value
        return {"running": state == "running", "singlestep": False, "status": state}

    def props(i: int) -> dict[str, int]:
        return {"core-id": i, "socket-id": 0, "thread-id": 0}

    def query_cpus(args: dict[str, Any]) -> object:
        return [{"CPU": c.index, "arch": CPU_ARCH, "current": c.index == 0, "halted": c.halted,
                 "props": props(c.index), "qom_path": f"/machine/unattached/device[{c.index}]",
                 "thread_id": c.thread_id} for c in vcpu_info()]

    def vcpu_info() -> list[VcpuInfo]:
        return cast(list[VcpuInfo], _answer(lambda: machine.request(QueryVcpus())))

    def query_cpus_fast(args: dict[str, Any]) -> object:
        return [{"cpu-index": v.index, "props": props(v.index),
                 "qom-path": f"/machine/unattached/device[{v.index}]", "thread-id": v.thread_id,
                 "target": arch.MACHINE} for v in machine.vcpus]

    def query_hotpluggable_cpus(args: dict[str, Any]) -> object:
        return [{"props": props(v.index), "qom-path": f"/machine/unattached/device[{v.index}]",
                 "type": CPU_TYPE, "vcpus-count": 1} for v in machine.vcpus]

    def query_vm_generation_id(args: dict[str, Any]) -> object:
        if machine.vmgenid is None:
            raise QmpError("GenericError", "VM Generation ID device not found (the VM has no ACPI)")
        return {"guid": guid_string(machine.vmgenid.id)}

    def balloon_device() -> None:
        if machine.devices.balloon is None:
            raise QmpError("DeviceNotActive", "No balloon device has been activated")

    def balloon(args: dict[str, Any]) -> object:
        """QEMU's: the guest's memory to become ``value`` bytes (the balloon takes the rest)."""
        balloon_device()
        if args["value"] <= 0:
            raise QmpError("GenericError", "Parameter 'target' expects a size")
        size = machine.cfg.mem_size
        return _checked(lambda: machine.request(SetBalloon((size - min(args["value"], size)) >> PAGE_SHIFT)))

    def query_balloon(args: dict[str, Any]) -> object:
        balloon_device()
        info = _answer(lambda: machine.request(QueryBalloon()))
        assert isinstance(info, dict)
        return {"actual": machine.cfg.mem_size - (info["actual_pages"] << PAGE_SHIFT)}

    def quit_(args: dict[str, Any]) -> object:
        machine.request_stop(HOST_QMP_QUIT)      # SHUTDOWN goes out before this reply
        return {}

    table: dict[str, Command] = {
        "qmp_capabilities": Command(lambda a: {}, {"enable": (list, False)}),
        "stop": Command(_ask(machine, lambda a: Pause())),
        "cont": Command(_ask(machine, lambda a: Resume())),
        "quit": Command(quit_),
        "system_reset": Command(_ask(machine, lambda a: Reset())),
        "system_powerdown": Command(_ask(machine, lambda a: Powerdown())),
        "query-status": Command(query_status),
        "query-cpus": Command(query_cpus),
        "query-cpus-fast": Command(query_cpus_fast),
        "query-hotpluggable-cpus": Command(query_hotpluggable_cpus),
        "query-version": Command(lambda a: version()),
        "query-name": Command(lambda a: {"name": machine.cfg.name}),
        "query-uuid": Command(lambda a: {"UUID": machine.cfg.uuid or NO_UUID}),
        "query-vm-generation-id": Command(query_vm_generation_id),
        "balloon": Command(balloon, {"value": (int, True)}),
        "query-balloon": Command(query_balloon),
    }
    if machine.hotplug is not None:
        table.update(hotplug_commands(machine, fds))
    if machine.xenstore is not None:
        table.update(xenstore_commands(machine.xenstore))
    if machine.migration is not None:
        from .migration import migration_commands
        table.update(migration_commands(machine))
    if machine.forker is not None:
        from .fork import fork_commands
        table.update(fork_commands(machine, fds))
    table["query-commands"] = Command(lambda a: [{"name": n} for n in sorted(table)])
    return table


def serve(machine: Machine, path: str) -> QmpServer:
    """QMP for ``machine`` on the unix socket ``path``, serving; VmmError (usage) if the
    socket cannot be made. The front ends hand this to vmm.run.run_vm."""
    try:
        fds: dict[str, int] = {}
        qmp = QmpServer(path, build(machine, fds), version(), functools.partial(seccomp.confine, "api"),
                        named_fds=fds)
    except BackendError as e:
        raise VmmError(f"-api-channel: {e.strerror}", exit_status=EXIT_USAGE) from e
    machine.add_event_listener(qmp.event)
    qmp.start()
    return qmp
