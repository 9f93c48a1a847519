"""A built VM's state as snapshot sections (:mod:`altovirt.snapshot.format`), and back.

One section per component, named after it, holding its saved state (see
:mod:`altovirt.persist`) as JSON: ``config`` (the VM's machine and devices as
a -config document, from which a Firecracker-style snapshot/load builds the
VM; a VM started with -incoming has its own), ``kvm`` (vCPUs, interrupt controllers, PIT,
clock), the board's own devices (a PC's ``serial``, ``i8042`` and ``rtc``, an Arm
board's ``pl011``, ``pl031`` and ``pl061``), ``hotplug`` (backends and slots),
``virtio-mmio.N`` (each slot's transport and queues) or, on a PCI machine, ``virtio-pci.N``
(each function's, with its configuration space and MSI-X state, in the order of their places
on the bus) and ``pcie-root-port.N`` (each root port's configuration space), and ``xenstore``. The
header names what a VM must match to take them: the architecture, vCPU count and
the host CPU (:func:`altovirt.arch.host_cpu`). :func:`parse` reads sections
into plain data (:class:`VmState`), :func:`restore` puts that into a VM.
Imported only when a VM is saved or restored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import arch
from ..config import jsonconfig
from ..devices.legacy.persist import I8042State, Pl011State, Pl031State, Pl061State, RtcState, SerialState
from ..devices.pci.persist import RootPortState
from ..devices.virtio.persist import PciFunctionState, TransportState
from ..kvm import KvmError
from ..persist import SavedStateError, from_json, to_json
from ..persist import prepare as prepare_state
from ..snapshot.format import Section, SnapshotError
from .persist import HotplugState, VmState

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..devices.pci.root_port import RootPort
    from .machine import Machine

log = logging.getLogger(__name__)

VERSION = 1                         # of every section below but xenstore's (its own envelope)
PORT = "pcie-root-port"
T = TypeVar("T")
# The board devices' sections, of either machine (DeviceManager.board_devices names a VM's).
BOARD_STATES: dict[str, type] = {"serial": SerialState, "i8042": I8042State, "rtc": RtcState,
                                 "pl011": Pl011State, "pl031": Pl031State, "pl061": Pl061State}


def _section(name: str, state: object) -> Section:
    return Section(name, VERSION, json.dumps(to_json(state), separators=(",", ":")).encode())


def _payload(sections: dict[str, Section], name: str, missing: str = "missing") -> bytes:
    """Section ``name``'s payload; SnapshotError if it is ``missing`` or of another version."""
    section = sections.get(name)
    if section is None:
        raise SnapshotError(f"section {name}: {missing}")
    if section.version != VERSION:
        raise SnapshotError(f"section {name}: version {section.version}; this AltoVirt reads {VERSION}")
    return section.payload


def _state(sections: dict[str, Section], name: str, cls: type[T]) -> T:
    payload = _payload(sections, name)
    try:
        return from_json(cls, json.loads(payload), name)
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"section {name}: {e}") from e


def save(m: Machine, msrs: list[int], clock: int, *,
         fork: bool = False) -> tuple[dict[str, Any], list[Section]]:
    """The header and sections of ``m``, paused with its device work still; ``msrs`` are
    the registers to keep and ``clock`` the guest's clock at the pause (arch.read_clock).
    ``fork``: ``m`` runs on after, its vsock's connections kept (the child's guest hears
    their end when it starts). SaveError if a device cannot be saved as it stands."""
    d = m.devices
    assert d.hotplug is not None
    kvm_state = arch.save_state(m.vm, [v.vcpu for v in m.vcpus], msrs)
    kvm_state = dataclasses.replace(kvm_state, vm=dataclasses.replace(kvm_state.vm, clock=clock))
    sections = [Section("config", VERSION, json.dumps(jsonconfig.to_dict(m.cfg)).encode()),
                _section("kvm", kvm_state),
                *(_section(name, device.save()) for name, device in d.board_devices().items()),
                _section("hotplug", d.hotplug.save())]
    if m.xenstore is not None:
        # Before the transports: saving vsock closes the guest's XenStore connections,
        # whose sessions the snapshot keeps for the guest to take up again.
        from ..xenstore import snapshot as xs
        sections.append(Section("xenstore", xs.VERSION, xs.save(m.xenstore)))
    kind = _transports(m)
    sections += [_section(f"{kind}.{i}", t.save(prepare=not (fork and t.device is m.vsock)))
                 for i, t in enumerate(d.transports)]
    sections += [_section(f"{PORT}.{i}", p.save()) for i, p in enumerate(_root_ports(m))]
    return {"machine": arch.MACHINE, "vcpus": len(m.vcpus), "memory_size": m.mem.size,
            "cpu": _host_cpu(m)}, sections


def parse(header: dict[str, Any], sections: dict[str, Section]) -> VmState:
    """The state in ``sections``, every section read and checked; SnapshotError naming the
    section and the reason for one that is missing, unknown or malformed, or if it was saved
    on another architecture (first: its sections are that machine's)."""
    machine = header.get("machine", "x86_64")       # snapshots from before arm64 did not say
    if machine != arch.MACHINE:
        raise SnapshotError(f"header: saved on an {machine} host; this {arch.MACHINE} host cannot run it")
    kind = "virtio-pci" if "virtio-pci.0" in sections else "virtio-mmio"
    count, ports = _count(sections, kind), _count(sections, PORT)
    unknown = sorted(set(sections) - {"config", "kvm", "xenstore", "hotplug", *BOARD_STATES,
                                      *(f"{kind}.{i}" for i in range(count)),
                                      *(f"{PORT}.{i}" for i in range(ports))})
    if unknown:
        raise SnapshotError(f"section {unknown[0]}: unknown component")
    names = [f"{kind}.{i}" for i in range(count)]
    transports: tuple[TransportState, ...] | tuple[PciFunctionState, ...] = \
        tuple(_state(sections, n, PciFunctionState) for n in names) if kind == "virtio-pci" \
        else tuple(_state(sections, n, TransportState) for n in names)
    return VmState(header, _state(sections, "kvm", arch.PowerOnState),
                   _state(sections, "hotplug", HotplugState), transports,
                   {name: _state(sections, name, cls) for name, cls in BOARD_STATES.items()
                    if name in sections},
                   sections.get("xenstore"),
                   tuple(_state(sections, f"{PORT}.{i}", RootPortState) for i in range(ports)))


def prepare() -> None:
    """Resolve now what :func:`parse` reads states with (a live migration's destination does,
    before the stream comes, as parsing the state is part of the guest's downtime)."""
    for cls in (arch.PowerOnState, HotplugState, TransportState, PciFunctionState, RootPortState,
                *BOARD_STATES.values()):
        prepare_state(cls)


def _count(sections: dict[str, Section], kind: str) -> int:
    """How many sections ``kind.0``, ``kind.1``... there are, in a row."""
    count = 0
    while f"{kind}.{count}" in sections:
        count += 1
    return count


def _root_ports(m: Machine) -> list[RootPort]:
    slots = m.devices.hotplug.pci if m.devices.hotplug is not None else None
    return [] if slots is None else slots.in_order()


def _transports(m: Machine) -> str:
    """What the VM's virtio devices' sections are named after."""
    return "virtio-mmio" if m.devices.pci is None else "virtio-pci"


def _host_cpu(m: Machine) -> dict[str, Any]:
    """What ``m``'s host CPU gives its guest (through the VM's CPU template)."""
    return arch.host_cpu(m.kvm, m.vcpus[0].vcpu, arch.cpu_template(m.cfg.cpu_template, m.kvm))


def check_memory_size(header: dict[str, Any], size: int) -> None:
    """SnapshotError unless the snapshot's RAM is ``size`` bytes, as this VM's is."""
    if header.get("memory_size") != size:
        raise SnapshotError(f"header: {header.get('memory_size')} bytes of RAM saved; "
                            f"this VM has {size} (-m)")


def _check_fits(m: Machine, state: VmState) -> None:
    """SnapshotError unless ``state`` was saved from a VM made as ``m`` is, on a like CPU."""
    header, slots = state.header, len(m.devices.transports)
    if header.get("vcpus") != len(m.vcpus):
        raise SnapshotError(f"header: {header.get('vcpus')} vCPUs saved; this VM has {len(m.vcpus)} (-smp)")
    check_memory_size(header, m.mem.size)
    try:
        arch.check_cpu(header.get("cpu"), _host_cpu(m))
    except SavedStateError as e:
        raise SnapshotError(f"header: {e}") from e
    board = m.devices.board_devices()
    differ = sorted(board.keys() ^ state.board.keys())
    if differ:
        name = differ[0]
        raise SnapshotError(f"section {name}: " + ("missing" if name in board else "unknown component"))
    kind = _transports(m)
    saved = "virtio-pci" if any(isinstance(t, PciFunctionState) for t in state.transports) else "virtio-mmio"
    if state.transports and saved != kind:
        raise SnapshotError(f"section {saved}.0: saved from a VM whose devices are {saved}; this VM's are "
                            f"{kind} (-machine {'q35' if kind == 'virtio-pci' else 'microvm'})")
    if len(state.transports) > slots:
        hint = "a VM with -api-channel has hot-plug slots" if kind == "virtio-mmio" else (
            "give it the devices the saved VM had, those hot-plugged into root ports too "
            "(-device ...,bus=PORT)")
        raise SnapshotError(f"section {kind}.{slots}: this VM has no such component; {hint}")
    if len(state.transports) < slots:
        raise SnapshotError(f"section {kind}.{len(state.transports)}: missing")
    ports = len(_root_ports(m))
    if len(state.root_ports) != ports:
        name = f"{PORT}.{min(ports, len(state.root_ports))}"
        raise SnapshotError(f"section {name}: " + ("missing" if len(state.root_ports) < ports else
                                                   "this VM has no such root port (-device pcie-root-port)"))
    if state.xenstore is not None and m.xenstore is None:
        raise SnapshotError("section xenstore: saved, but this VM has no -xenstore")
    if state.xenstore is None and m.xenstore is not None:
        raise SnapshotError("section xenstore: missing, but this VM has a XenStore")


def restore(m: Machine, state: VmState) -> int:
    """Put ``state`` into ``m``, built from a matching configuration and never run; returns
    the kvmclock to resume from. SnapshotError naming the section and the reason for state
    that does not fit (a VM that took part of it must not run)."""
    _check_fits(m, state)
    d = m.devices
    assert d.hotplug is not None
    # Hot-plug first: it puts the saved devices into the slots whose transports follow; the
    # root ports before the transports behind them, whose MSI routes carry the bus number the
    # guest gave the port (the requester ID arm64's ITS goes by).
    steps: list[tuple[str, Callable[[], None]]] = [
        ("hotplug", functools.partial(d.hotplug.restore, state.hotplug))]
    steps += [(f"{PORT}.{i}", functools.partial(p.restore, st))
              for i, (p, st) in enumerate(zip(_root_ports(m), state.root_ports, strict=True))]
    kind = _transports(m)
    steps += [(f"{kind}.{i}", functools.partial(t.restore, st))  # type: ignore[arg-type]
              for i, (t, st) in enumerate(zip(d.transports, state.transports, strict=True))]
    if d.pci is not None:
        steps.append((f"{kind}.*", d.pci.refresh))       # the BARs, where the functions had them
    steps += [(name, functools.partial(device.restore, state.board[name]))
              for name, device in d.board_devices().items()]
    steps += [("kvm", lambda: arch.restore_state(m.vm, [v.vcpu for v in m.vcpus], state.kvm))]
    if state.xenstore is not None:
        xenstore = state.xenstore
        steps.append(("xenstore", lambda: _load_xenstore(m, xenstore)))
    for name, step in steps:
        try:
            step()
        except (SavedStateError, KvmError) as e:
            raise SnapshotError(f"section {name}: {e}") from e
    # Last, with the interrupt controllers in place: the interrupts devices still owe (a
    # vsock's transport reset event, say), or the guest would look at those queues only
    # at the device's next interrupt.
    for transport in d.transports:
        transport.interrupt.raise_pending()
    return state.kvm.vm.clock


def _load_xenstore(m: Machine, section: Section) -> None:
    from ..xenstore import snapshot as xs
    assert m.xenstore is not None
    if section.version != xs.VERSION:
        raise SavedStateError(f"version {section.version}; this AltoVirt reads {xs.VERSION}")
    xs.load(m.xenstore, section.payload)


def saved_config(sections: dict[str, Section]) -> VmConfig:
    """The configuration of the VM a snapshot was taken of (its ``config`` section)."""
    payload = _payload(sections, "config",
                       "missing (a snapshot from an older AltoVirt); load it with -incoming")
    try:
        return jsonconfig.from_dict(json.loads(payload))
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"section config: {e}") from e
