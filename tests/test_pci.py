"""The PCIe host bridge and virtio-pci, driven in-process as Linux drives them: enumerate
bus 0 through ECAM and ports 0xCF8/0xCFC, size and move BARs, walk the capabilities, set up
MSI-X and a queue through the common configuration, and do block I/O on a real image with
the interrupts routed by real KVM (the guest-visible proof is tests/linux/test_pci.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp.legacy import QEMUMonitorProtocol

from altovirt import arch
from altovirt.arch.x86_64 import layout
from altovirt.backends.blockfile import BlockFile
from altovirt.config import jsonconfig, load_config
from altovirt.config.model import ConfigError, RootPortConfig
from altovirt.devices.bus import Bus
from altovirt.devices.pci import config as C
from altovirt.devices.pci.intx import IntxLine
from altovirt.devices.pci.msix import NO_VECTOR, MsiMessage
from altovirt.devices.pci.root import ConfigPorts, Ecam, PciRoot, devfn
from altovirt.devices.virtio import block as vblk
from altovirt.devices.virtio import pci as vpci
from altovirt.devices.virtio.transport import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
from altovirt.eventloop import EventLoop
from altovirt.kvm import Kvm
from altovirt.memory import GuestMemory
from altovirt.persist import SavedStateError
from altovirt.vmm import builder
from altovirt.vmm.msi import GsiRoutes, Vectors

from .conftest import Vm, needs_kvm, run_altovirt
from .test_acpi import compiles_back, iasl, needs_iasl, tables_in_ram
from .virtq import DriverQueue

ECAM = layout.PCI_ECAM_START
MSI_ADDRESS = 0xFEE00000


@dataclass
class Machine:
    """Bus 0 with one virtio-blk function at 00:03.0 on a real image, KVM routing its vectors."""

    mem: GuestMemory
    mmio: Bus
    pio: Bus
    root: PciRoot
    transport: vpci.PciTransport
    vectors: Vectors
    io: EventLoop
    ioeventfds: dict[int, int]          # guest address -> eventfd, as KVM holds them


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    with made(tmp_path / "disk.img") as m:
        yield m


@contextlib.contextmanager
def made(image: Path, intx: IntxLine | None = None) -> Iterator[Machine]:
    """The machine on ``image``; its function's INTA# goes to ``intx`` (None: it has none)."""
    if not image.exists():
        image.write_bytes(bytes(range(256)) * 4096)
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    mem = GuestMemory(layout.ram_regions(128 << 20))
    io = EventLoop()
    io.start()
    pool = vblk.WorkerPool()
    pool.start()
    mmio, pio = Bus("mmio"), Bus("pio")
    root = PciRoot(mmio, (ECAM, layout.PCI_ECAM_SIZE), (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
                   (1 << 32, 1 << 30), [(r.gpa, r.end) for r in mem.regions], layout.PCI_INTX_GSIS)
    mmio.insert(Ecam(root), ECAM, layout.PCI_ECAM_SIZE)
    pio.insert(ConfigPorts(root), 0xCF8, 8)
    vectors = Vectors(GsiRoutes(vm, arch.irqchip_routes()), 2)
    ioeventfds: dict[int, int] = {}

    def ioeventfd(fd: int, addr: int, assign: bool) -> None:
        vm.ioeventfd(fd, addr, 0, deassign=not assign)
        if assign:
            ioeventfds[addr] = fd
        else:
            del ioeventfds[addr]

    device = vblk.Block("d0", BlockFile(str(image), read_only=False, direct=False), pool)
    transport = vpci.PciTransport(device, mem, io, vectors, ioeventfd, intx)
    root.add(transport, devfn(3))
    try:
        yield Machine(mem, mmio, pio, root, transport, vectors, io, ioeventfds)
    finally:
        transport.close()
        vectors.close()
        io.stop()
        pool.stop()
        mem.close()
        vm.close()
        kvm.close()


def cfg_read(m: Machine, at: int, offset: int, size: int = 4) -> int:
    return m.mmio.read(ECAM + (at << 12) + offset, size)


def cfg_write(m: Machine, at: int, offset: int, size: int, value: int) -> None:
    m.mmio.write(ECAM + (at << 12) + offset, size, value)


def capabilities(m: Machine, at: int) -> list[tuple[int, int]]:
    """(offset, ID) of each capability, walked as pci_find_capability does."""
    caps: list[tuple[int, int]] = []
    offset = cfg_read(m, at, C.CAPABILITY_LIST, 1)
    while offset and len(caps) < 48:
        caps.append((offset, cfg_read(m, at, offset, 1)))
        offset = cfg_read(m, at, offset + 1, 1)
    return caps


def test_enumeration_through_ecam_and_the_ports(machine: Machine) -> None:
    m = machine
    assert cfg_read(m, devfn(0), 0) == 0x00081B36                     # the host bridge
    assert cfg_read(m, devfn(0), 0x08) >> 8 == 0x060000
    assert cfg_read(m, devfn(3), 0) == 0x10421AF4                     # virtio-blk, modern
    assert cfg_read(m, devfn(3), C.SUBSYSTEM_VENDOR_ID) == 0x11001AF4
    assert cfg_read(m, devfn(3), 0x08) & 0xFF == 1                    # revision 1: non-transitional
    assert cfg_read(m, devfn(4), 0) == 0xFFFFFFFF                     # nobody: a master abort
    assert m.mmio.read(ECAM + (1 << 20), 4) == 0xFFFFFFFF             # no bus 1
    # Configuration mechanism #1: the same registers through 0xCF8/0xCFC
    m.pio.write(0xCF8, 4, 0x80000000 | devfn(3) << 8)
    assert m.pio.read(0xCF8, 4) == 0x80000000 | devfn(3) << 8
    assert m.pio.read(0xCFC, 4) == 0x10421AF4
    assert m.pio.read(0xCFE, 2) == 0x1042
    m.pio.write(0xCF8, 4, 0x00000000)                                # enable bit clear
    assert m.pio.read(0xCFC, 4) == 0xFFFFFFFF


def test_bar_sizing_and_moving(machine: Machine) -> None:
    m, at = machine, devfn(3)
    low, high = cfg_read(m, at, C.BAR0), cfg_read(m, at, C.BAR0 + 4)
    addr = (low & ~0xF) | high << 32
    assert low & 0xF == C.BAR_MEM64 | C.BAR_PREFETCH and addr == 1 << 32
    notify = addr + vpci.NOTIFY_OFFSET
    assert m.ioeventfds == {notify: m.transport.notify_fds[0]}
    # Linux sizes with decoding off: the mapping goes, and the size reads back.
    cfg_write(m, at, C.COMMAND, 2, 0)
    assert m.ioeventfds == {} and m.mmio.find(addr) is None
    cfg_write(m, at, C.BAR0, 4, 0xFFFFFFFF)
    cfg_write(m, at, C.BAR0 + 4, 4, 0xFFFFFFFF)
    size = ~((cfg_read(m, at, C.BAR0) & ~0xF) | cfg_read(m, at, C.BAR0 + 4) << 32) + 1 & (1 << 64) - 1
    assert size == vpci.BAR_SIZE
    # Moved to the 32-bit window and decoding on: registers and notifications follow.
    cfg_write(m, at, C.BAR0, 4, layout.PCI_MMIO32_START)
    cfg_write(m, at, C.BAR0 + 4, 4, 0)
    cfg_write(m, at, C.COMMAND, 2, C.COMMAND_MEMORY | C.COMMAND_MASTER)
    new = layout.PCI_MMIO32_START
    assert m.mmio.read(new + vpci.COMMON_OFFSET + vpci.NUM_QUEUES, 2) == 1
    assert m.ioeventfds == {new + vpci.NOTIFY_OFFSET: m.transport.notify_fds[0]}
    # Over RAM, or over the ECAM: left unmapped, and the VMM carries on.
    for bad in (0x100000, ECAM):
        cfg_write(m, at, C.BAR0, 4, bad)
        assert m.mmio.find(new) is None and m.ioeventfds == {}
        assert m.mmio.read(bad, 4) != 1 or bad == ECAM


def test_virtio_capabilities_point_into_bar0(machine: Machine) -> None:
    m, at = machine, devfn(3)
    caps = capabilities(m, at)
    assert [cap_id for _, cap_id in caps] == [C.CAP_ID_VENDOR] * 5 + [C.CAP_ID_MSIX]
    found = {}
    for offset, _ in caps[:5]:
        cap_len, cfg_type, bar = (cfg_read(m, at, offset + i, 1) for i in (2, 3, 4))
        found[cfg_type] = (cap_len, bar, cfg_read(m, at, offset + 8), cfg_read(m, at, offset + 12))
    assert found[vpci.COMMON_CFG] == (16, 0, vpci.COMMON_OFFSET, vpci.COMMON_SIZE)
    assert found[vpci.NOTIFY_CFG] == (20, 0, vpci.NOTIFY_OFFSET, vpci.NOTIFY_MULTIPLIER)
    assert found[vpci.ISR_CFG][2] == vpci.ISR_OFFSET and found[vpci.DEVICE_CFG][2] == vpci.DEVICE_OFFSET
    msix = caps[5][0]
    assert cfg_read(m, at, msix + 2, 2) == 1                           # 2 vectors, off
    assert cfg_read(m, at, msix + 4) == vpci.TABLE_OFFSET and cfg_read(m, at, msix + 8) == vpci.PBA_OFFSET


def bar0(m: Machine) -> int:
    return (cfg_read(m, devfn(3), C.BAR0) & ~0xF) | cfg_read(m, devfn(3), C.BAR0 + 4) << 32


def driver_setup(m: Machine, q: DriverQueue, *, msix: bool = True) -> None:
    """virtio_pci_modern's probe and vp_find_vqs_msix with a vector a queue, as Linux 6.1 does
    (without ``msix``, vp_find_vqs_intx: no vectors, the ISR and INTA#)."""
    base, at = bar0(m), devfn(3)
    common = base + vpci.COMMON_OFFSET
    vector = (0, 1) if msix else (NO_VECTOR, NO_VECTOR)
    if msix:
        cap = capabilities(m, at)[5][0]
        cfg_write(m, at, cap + 2, 2, 0xC000)                            # enable, function masked
        for v in range(2):
            entry = base + vpci.TABLE_OFFSET + 16 * v
            m.mmio.write(entry, 4, MSI_ADDRESS)
            m.mmio.write(entry + 4, 4, 0)
            m.mmio.write(entry + 8, 4, 0x30 + v)
        cfg_write(m, at, cap + 2, 2, 0x8000)                            # function unmasked
    m.mmio.write(common + vpci.DEVICE_STATUS, 1, 0)
    m.mmio.write(common + vpci.DEVICE_STATUS, 1, ACKNOWLEDGE | DRIVER)
    features = m.transport.device.device_features()          # Linux's virtio_blk takes them all
    for word in range(2):
        m.mmio.write(common + vpci.DRIVER_FEATURE_SELECT, 4, word)
        m.mmio.write(common + vpci.DRIVER_FEATURE, 4, features >> (32 * word) & 0xFFFFFFFF)
    m.mmio.write(common + vpci.DEVICE_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert m.mmio.read(common + vpci.DEVICE_STATUS, 1) & FEATURES_OK
    m.mmio.write(common + vpci.CONFIG_MSIX_VECTOR, 2, vector[0])
    assert m.mmio.read(common + vpci.CONFIG_MSIX_VECTOR, 2) == vector[0]
    m.mmio.write(common + vpci.QUEUE_SELECT, 2, 0)
    assert m.mmio.read(common + vpci.QUEUE_SIZE, 2) == vblk.QUEUE_SIZE
    m.mmio.write(common + vpci.QUEUE_SIZE, 2, q.size)
    rings = ((vpci.QUEUE_DESC, q.desc), (vpci.QUEUE_DRIVER, q.avail), (vpci.QUEUE_DEVICE, q.used))
    for offset, addr in rings:
        m.mmio.write(common + offset, 4, addr & 0xFFFFFFFF)
        m.mmio.write(common + offset + 4, 4, addr >> 32)
    m.mmio.write(common + vpci.QUEUE_MSIX_VECTOR, 2, vector[1])
    assert m.mmio.read(common + vpci.QUEUE_MSIX_VECTOR, 2) == vector[1]
    for v in range(2 if msix else 0):                                   # request_irq unmasks
        m.mmio.write(base + vpci.TABLE_OFFSET + 16 * v + 12, 4, 0)
    m.mmio.write(common + vpci.QUEUE_ENABLE, 2, 1)
    m.mmio.write(common + vpci.DEVICE_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


def read_sector(m: Machine, q: DriverQueue, sector: int) -> bytes:
    """A read of one sector, notified as Linux does (a 16-bit write of the queue index)."""
    header, data = 0x200000 + 0x1000 * q.avail_idx, 0x300000 + 0x1000 * q.avail_idx
    m.mem.write(header, vblk._HEADER.pack(vblk.VIRTIO_BLK_T_IN, 0, sector))
    q.publish(q.chain([(header, 16, False), (data, 512, True), (data + 512, 1, True)]))
    before = q.used_idx()
    q.set_used_event(before)                                            # an interrupt for this one
    os.eventfd_write(m.ioeventfds[bar0(m) + vpci.NOTIFY_OFFSET], 1)    # what KVM does on the write
    deadline = time.monotonic() + 10
    while q.used_idx() == before:
        assert time.monotonic() < deadline, "the request was not completed"
        time.sleep(0.001)
    assert m.mem.read(data + 512, 1) == b"\0"
    return m.mem.read(data, 512)


def test_block_io_with_a_vector_a_queue(machine: Machine) -> None:
    m = machine
    q = DriverQueue(m.mem, 0x100000, 256)
    driver_setup(m, q)
    routes = m.vectors.routes._msi
    assert routes == {m.vectors.gsis[0]: (MsiMessage(MSI_ADDRESS, 0, 0x30), None),
                      m.vectors.gsis[1]: (MsiMessage(MSI_ADDRESS, 0, 0x31), None)}
    assert read_sector(m, q, 1) == bytes(range(256)) * 2
    # Masked, a vector has no route: what it raises waits in its eventfd (KVM takes it when the
    # route comes back, as the PBA would hold it). The queue raised its own vector, not config's.
    for v in range(2):
        m.mmio.write(bar0(m) + vpci.TABLE_OFFSET + 16 * v + 12, 4, 1)
    assert read_sector(m, q, 2) == bytes(range(256)) * 2
    assert os.eventfd_read(m.vectors.fds[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(m.vectors.fds[0])


def test_what_a_driver_gets_wrong_is_ignored(machine: Machine) -> None:
    """Vectors past the table read back as NO_VECTOR, a notification before DRIVER_OK reaches
    no device, odd-sized and out-of-range accesses are dropped: the device and the VMM go on."""
    m, base = machine, bar0(machine)
    common = base + vpci.COMMON_OFFSET
    m.mmio.write(common + vpci.CONFIG_MSIX_VECTOR, 2, 7)
    assert m.mmio.read(common + vpci.CONFIG_MSIX_VECTOR, 2) == vpci.NO_VECTOR
    m.mmio.write(common + vpci.QUEUE_SELECT, 2, 9)                     # no such queue
    m.mmio.write(common + vpci.QUEUE_ENABLE, 2, 1)
    assert m.mmio.read(common + vpci.QUEUE_SIZE, 2) == 0
    m.mmio.write(base + vpci.NOTIFY_OFFSET, 2, 0)                      # before DRIVER_OK
    m.mmio.write(base + vpci.TABLE_OFFSET + 3, 2, 0xFFFF)              # misaligned
    m.mmio.write(base + vpci.TABLE_OFFSET + 0x7FF0, 4, 1)              # past the table
    assert m.mmio.read(base + vpci.TABLE_OFFSET + 2, 2) == 0
    cfg_write(m, devfn(3), 0xFFE, 4, 0xFFFFFFFF)                       # past the space
    assert m.transport.status == 0 and cast(vblk.Block, m.transport.device).active is None
    q = DriverQueue(m.mem, 0x100000, 256)
    driver_setup(m, q)                                                 # and it still works
    assert read_sector(m, q, 3) == bytes(range(256)) * 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([devfn(0), devfn(3)]), st.integers(0, 0x1000),
                          st.sampled_from([1, 2, 4, 3, 8]), st.integers(0, 0xFFFFFFFF)), max_size=40))
def test_configuration_writes_never_break_the_function(machine: Machine,
                                                       writes: list[tuple[int, int, int, int]]) -> None:
    """Whatever a guest writes to configuration space: the IDs and the capability list stay,
    nothing raises, and BAR 0 is mapped exactly where its registers say while decoding is on
    (unless that is over RAM or another device)."""
    m = machine
    for at, offset, size, value in writes:
        cfg_write(m, at, offset, size, value & ((1 << 8 * min(size, 4)) - 1))
    assert cfg_read(m, devfn(3), 0) == 0x10421AF4 and cfg_read(m, devfn(0), 0) == 0x00081B36
    assert [cap_id for _, cap_id in capabilities(m, devfn(3))] == [C.CAP_ID_VENDOR] * 5 + [C.CAP_ID_MSIX]
    config = m.transport.config
    bar = config.bars[0]
    assert bar is not None
    mapped = m.transport.mapped[0]
    if mapped is not None:
        assert config.memory_enabled and mapped == config.bar_address(bar)
        assert m.ioeventfds == {mapped + vpci.NOTIFY_OFFSET: m.transport.notify_fds[0]}
    else:
        assert m.ioeventfds == {}
    cfg_write(m, devfn(3), C.COMMAND, 2, 0)                             # put it back for the next example
    cfg_write(m, devfn(3), C.BAR0, 4, 0)
    cfg_write(m, devfn(3), C.BAR0 + 4, 4, 1)
    cfg_write(m, devfn(3), C.COMMAND, 2, C.COMMAND_MEMORY)
    m.transport.msix.reset()


@needs_kvm
@needs_iasl
def test_firmware_describes_the_host_bridge(probe: Path, tmp_path: Path) -> None:
    """-machine q35: the MCFG names the ECAM, the DSDT's PCI0 its windows (ACPICA reads both
    and compiles the DSDT back to the same bytes), the FADT allows MSI, and the e820 map
    reserves the ECAM but leaves the windows free."""
    m = builder.build(load_config(["-kernel", str(probe / "probe.elf"), "-machine", "q35", "-device",
                                   "virtio-rng-pci,id=r0,addr=0x7"]))
    try:
        assert m.mem is not None
        area = m.mem.read(layout.ACPI_START, layout.ACPI_SIZE)
    finally:
        m.close()
    tables = tables_in_ram(area)
    mcfg = iasl(tmp_path, "MCFG", tables["MCFG"])
    assert re.search(r"Base Address : 00000000E0000000", mcfg) and re.search(r"End Bus Number : FF", mcfg)
    facp = iasl(tmp_path, "FACP", tables["FACP"])
    assert re.search(r"MSI Not Supported \(V4\) : 0", facp), facp
    dsl = iasl(tmp_path, "DSDT", tables["DSDT"])
    assert 'Name (_HID, EisaId ("PNP0A08")' in dsl and 'Name (_CID, EisaId ("PNP0A03")' in dsl

    def window(kind: str, first: int, last: int) -> str:
        digits = 8 if kind == "DWord" else 16
        return (rf"{kind}Memory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, \w+, ReadWrite,.*?"
                rf"0x{first:0{digits}X}, +// Range Minimum\s+0x{last:0{digits}X}, +// Range Maximum")

    assert re.search(window("DWord", 0xC0000000, 0xCFFFFFFF), dsl, re.S), dsl
    assert re.search(window("QWord", 1 << 32, (1 << 32) + (64 << 30) - 1), dsl, re.S), dsl
    assert re.search(r'EisaId \("PNP0C02"\).*Memory32Fixed \(ReadWrite,\s+0xE0000000,.*0x10000000', dsl, re.S)
    assert '"LNRO0005"' not in dsl                                      # no virtio-mmio slots
    compiles_back(tmp_path, dsl, tables["DSDT"])


@needs_kvm
def test_the_probe_boots_on_q35(probe: Path, tmp_path: Path) -> None:
    """A PCI machine runs a guest to its end; its e820 map reserves the ECAM and the APICs only."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-serial", "stdio", "-machine", "q35", "-drive",
                       f"id=d0,file={disk},if=none", "-device", "virtio-blk-pci,drive=d0,id=vda,addr=0x2")
    assert run.returncode == 0 and run.report.done == "ok", run.stdout + run.stderr
    gap = [(a, s, t) for a, s, t in run.report.e820 if layout.MMIO_GAP_START <= a < layout.MMIO_GAP_END]
    assert gap == [(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, 2),
                   (layout.IOAPIC_ADDR, layout.MMIO_GAP_END - layout.IOAPIC_ADDR, 2)]
    assert run.report.values["cmdline"].split()[-1] == "pci=noearly"


@pytest.mark.parametrize("args, message", [
    (["-device", "virtio-blk-pci,drive=d0,id=x"],
     "-device virtio-blk-pci: a PCI device; it needs -machine q35"),
    (["-machine", "q35", "-device", "virtio-blk-device,drive=d0,id=x"],
     "-device virtio-blk-device: a virtio-mmio device; -machine q35 takes virtio-blk-pci"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,addr=0x0"],
     "'0x0' is not a PCI address; accepted: SLOT[.FUNCTION], slot 0x1 to 0x1f"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,addr=0x3.8"],
     "'0x3.8' is not a PCI address"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,bus=pcie.1"],
     "-device virtio-blk-pci: bus='pcie.1'; accepted: pcie.0"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,bus=rp", "-device", "pcie-root-port,id=rp,"
      "addr=3", "-device", "pcie-root-port,id=rp2,bus=rp"],
     "-device pcie-root-port: bus='rp'; accepted: pcie.0"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,bus=rp,addr=1", "-device",
      "pcie-root-port,id=rp"],
     "-device virtio-blk-pci: addr='1' behind root port rp; accepted: 0x0"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,bus=rp", "-device", "virtio-rng-pci,bus=rp",
      "-device", "pcie-root-port,id=rp"],
     "-device virtio-rng-pci: bus=rp: a root port takes virtio-blk-pci or virtio-net-pci; put it on pcie.0"),
    (["-machine", "q35", "-device", "pcie-root-port,id=rp,slot=3", "-device", "pcie-root-port,id=rq,slot=3"],
     "-device pcie-root-port: two root ports have the same chassis= and slot=; give each its own"),
    (["-device", "pcie-root-port,id=rp"], "-device pcie-root-port: a PCI device; it needs -machine q35"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,addr=4", "-device",
      "virtio-rng-pci,addr=4"],
     "-device virtio-rng-pci: addr 0x4.0 is taken by x"),
    (["-machine", "q35", "-device", "virtio-blk-pci,drive=d0,id=x,addr=4.2"],
     "-device x: addr 0x4.2: slot 0x4 has no function 0"),
    (["-machine", "pc"], "-machine: unknown machine type 'pc'; accepted: microvm, q35"),
])
def test_bad_placements_are_usage_errors(probe: Path, tmp_path: Path, args: list[str], message: str) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-drive", f"id=d0,file={disk},if=none", *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_a_function_saved_and_restored_carries_on(machine: Machine, tmp_path: Path) -> None:
    """The function's state (configuration space with a moved BAR, MSI-X table and routes, the
    vectors, the queue where the driver left it) goes into a new machine, which serves the
    driver's next request where the first left off; a state of another kind of function is
    refused, the function unchanged."""
    m = machine
    q = DriverQueue(m.mem, 0x100000, 256)
    driver_setup(m, q)
    assert read_sector(m, q, 1) == bytes(range(256)) * 2
    at = devfn(3)
    cfg_write(m, at, C.COMMAND, 2, 0)
    cfg_write(m, at, C.BAR0, 4, layout.PCI_MMIO32_START + 0x10000)
    cfg_write(m, at, C.BAR0 + 4, 4, 0)
    cfg_write(m, at, C.COMMAND, 2, C.COMMAND_MEMORY | C.COMMAND_MASTER)
    state = m.transport.save()
    (tmp_path / "copy.img").write_bytes((tmp_path / "disk.img").read_bytes())
    with made(tmp_path / "copy.img") as copy:
        copy.mem.write(0x100000, m.mem.read(0x100000, 0x10000))        # the rings, as RAM is restored
        bad = dataclasses.replace(state, config=bytes(4096))
        with pytest.raises(SavedStateError, match="another"):
            copy.transport.restore(bad)
        assert copy.transport.status == 0
        copy.transport.restore(state)
        copy.root.refresh()
        assert bar0(copy) == layout.PCI_MMIO32_START + 0x10000
        assert copy.mmio.read(bar0(copy) + vpci.COMMON_OFFSET + vpci.DEVICE_STATUS, 1) & DRIVER_OK
        assert copy.vectors.routes._msi == {copy.vectors.gsis[0]: (MsiMessage(MSI_ADDRESS, 0, 0x30), None),
                                            copy.vectors.gsis[1]: (MsiMessage(MSI_ADDRESS, 0, 0x31), None)}
        q.mem = copy.mem
        assert read_sector(copy, q, 2) == bytes(range(256)) * 2


@needs_kvm
def test_hot_plug_requests_into_root_ports(probe: Path, tmp_path: Path, vms: list[Vm]) -> None:
    """On -machine q35, device_add puts a disk and a NIC into root ports (bus=) and refuses what
    does not fit, one line each; device_del presses the attention button, and a second one
    while the guest has 5 s to answer is refused (as QEMU's); the VM runs on throughout.
    (The probe has no pciehp: the guest side is tests/test_pci_hotplug.py and the bed's.)"""
    disks = [tmp_path / "d.img", tmp_path / "e.img"]
    for disk in disks:
        disk.write_bytes(bytes(1 << 20))
    sock = tmp_path / "qmp.sock"
    vm = Vm("-kernel", str(probe / "probe.elf"), "-append", "probe.run=snapshot", "-serial", "stdio",
            "-machine", "q35", "-api-channel", f"unix:{sock}", "-drive", f"id=d0,file={disks[1]},if=none",
            "-device", "virtio-blk-pci,drive=d0,id=vda", "-device", "pcie-root-port,id=rp1,addr=0x5,slot=1",
            "-device", "pcie-root-port,id=rp2,addr=0x5.1,slot=2,port=2")
    vms.append(vm)
    vm.wait_line("probe: snap ready")
    qmp = QEMUMonitorProtocol(str(sock))
    qmp.connect(negotiate=True)

    def error(command: str, **arguments: object) -> str:
        reply = qmp.cmd_obj({"execute": command, "arguments": arguments})
        assert "error" in reply, reply
        desc = reply["error"]["desc"]
        assert "\n" not in desc and "Traceback" not in desc
        return cast(str, desc)

    try:
        node = {"node-name": "d1", "driver": "raw", "file": {"driver": "file", "filename": str(disks[0])}}
        assert qmp.cmd_obj({"execute": "blockdev-add", "arguments": node}) == {"return": {}}
        mmio = error("device_add", driver="virtio-blk-mmio", id="d1", bus="rp1")
        assert "expects one of virtio-blk-pci, virtio-net-pci" in mmio
        assert "Bus 'pcie.0' does not support" in error("device_add", driver="virtio-blk-pci", id="d1")
        assert "Bus 'rp9' not found; root ports: rp1, rp2" in error("device_add", driver="virtio-blk-pci",
                                                                     id="d1", bus="rp9")
        assert "device 0 only" in error("device_add", driver="virtio-blk-pci", id="d1", bus="rp1", addr="0x1")
        assert "no block node named 'd9'" in error("device_add", driver="virtio-blk-pci", id="d9", bus="rp1")
        add = {"driver": "virtio-blk-pci", "id": "d1", "bus": "rp1", "serial": "hot1"}
        assert qmp.cmd_obj({"execute": "device_add", "arguments": add}) == {"return": {}}
        assert "Duplicate device ID 'd1'" in error("device_add", **{**add, "bus": "rp2"})
        assert "busy" in error("blockdev-del", **{"node-name": "d1"})
        assert "Bus 'pcie.0' does not support hotplugging" in error("device_del", id="vda")
        assert qmp.cmd_obj({"execute": "device_del", "arguments": {"id": "d1"}}) == {"return": {}}
        assert "Device d1 is already in the process of unplug" in error("device_del", id="d1")
        assert "not found" in error("device_del", id="d7")
        assert qmp.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
    finally:
        qmp.close()


def test_a_machine_reset_puts_every_function_back(machine: Machine) -> None:
    """system_reset: the device reset, MSI-X off and unrouted, the BAR where the VMM placed it."""
    m = machine
    placed = bar0(m)
    q = DriverQueue(m.mem, 0x100000, 256)
    driver_setup(m, q)
    cfg_write(m, devfn(3), C.COMMAND, 2, 0)
    cfg_write(m, devfn(3), C.BAR0, 4, layout.PCI_MMIO32_START)
    cfg_write(m, devfn(3), C.BAR0 + 4, 4, 0)
    cfg_write(m, devfn(3), C.COMMAND, 2, C.COMMAND_MEMORY)
    m.root.reset()
    assert bar0(m) == placed and m.ioeventfds == {placed + vpci.NOTIFY_OFFSET: m.transport.notify_fds[0]}
    assert m.transport.status == 0 and not m.transport.msix.enabled and not any(m.vectors._bound)
    assert m.mmio.read(placed + vpci.COMMON_OFFSET + vpci.CONFIG_MSIX_VECTOR, 2) == vpci.NO_VECTOR
    driver_setup(m, q)                                                  # the driver starts again
    q.avail_idx = q.next_desc = 0
    m.mem.write(q.desc, bytes(q.used + 6 + 8 * q.size - q.desc))
    assert read_sector(m, q, 4) == bytes(range(256)) * 2


def test_root_ports_in_the_json_configuration(probe: Path, tmp_path: Path) -> None:
    """The command line's root ports, and the disk in one, come back the same through the
    -config document a snapshot keeps; a document that puts a port on microvm is refused."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    cfg = load_config(["-kernel", str(probe / "probe.elf"), "-machine", "q35", "-drive",
                       f"id=d0,file={disk},if=none", "-device", "virtio-blk-pci,drive=d0,id=vdb,bus=rp2",
                       "-device", "pcie-root-port,id=rp1,addr=0x6", "-device",
                       "pcie-root-port,id=rp2,addr=0x6.1,chassis=2,port=7"])
    assert cfg.root_ports == {"rp1": RootPortConfig(0, 0, 0, None), "rp2": RootPortConfig(1, 7, 2, "vdb")}
    assert cfg.pci_slots == {"rp1": devfn(6), "rp2": devfn(6, 1)}
    again = jsonconfig.from_dict(jsonconfig.to_dict(cfg))
    assert (again.root_ports, again.pci_slots, again.drives) == (cfg.root_ports, cfg.pci_slots, cfg.drives)
    with pytest.raises(ConfigError, match="root_ports: an object of root port id"):
        jsonconfig.from_dict({"machine-config": {"root_ports": {"rp1": {}}}})
