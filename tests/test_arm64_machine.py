"""The arm64 machine's parts that need no arm64 host: the device tree (read back by dtc, as
a guest's kernel would parse it), the Image loader, and the PL011, PL031 and PL061 as a
driver drives them. Booting on arm64 KVM is proven in the arm64 test bed."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt import persist
from altovirt.arch.aarch64 import boot, gic, gicstate, itsstate, layout, poweron
from altovirt.devices.legacy import pl011, pl031, pl061
from altovirt.memory import GuestMemory
from altovirt.persist import SavedStateError

MiB = 1 << 20
GICV3 = gic.Gic(3, ((0x080A_0000, 0x6_0000),))                   # 3 vCPUs' redistributors
GICV2 = gic.Gic(2, ((layout.GIC_CPU_BASE, layout.GIC_CPU_SIZE),))


def _image(text_offset: int = 0, image_size: int = 2 * MiB, body: bytes = b"") -> bytes:
    header = struct.pack("<IIQQQQQQII", 0x14000010, 0, text_offset, image_size, 0xA, 0, 0, 0,
                         boot.IMAGE_MAGIC, 0)
    return header + body


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(layout.ram_regions(256 * MiB))
    yield m
    m.close()


def _dts(blob: bytes) -> str:
    if shutil.which("dtc") is None:
        pytest.skip("SKIPPED LOUDLY: dtc (device-tree-compiler) is missing; run ./scripts/setup")
    return subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-q"], input=blob, capture_output=True,
                          check=True).stdout.decode()


def test_device_tree_describes_the_machine(mem: GuestMemory) -> None:
    initrd = b"\x42" * 5000
    plan = boot.prepare(mem, gzip.compress(_image(body=b"kernel")), "console=ttyAMA0 root=/dev/vda",
                        initrd, 3, boot.Firmware(((0x0A000000, 16), (0x0A000200, 17)), GICV3))
    assert plan.entry == layout.RAM_START
    assert mem.read(plan.entry + 64, 6) == b"kernel"
    assert plan.fdt_addr % 8 == 0 and plan.fdt_addr + layout.FDT_MAX_SIZE == layout.RAM_START + 256 * MiB
    assert mem.read(plan.initrd_addr, plan.initrd_size) == initrd
    assert plan.initrd_addr + plan.initrd_size <= plan.fdt_addr
    dts = _dts(mem.read(plan.fdt_addr, layout.FDT_MAX_SIZE))
    assert 'bootargs = "console=ttyAMA0 root=/dev/vda";' in dts
    assert f"linux,initrd-start = <0x00 {plan.initrd_addr:#x}>;" in dts
    assert f"linux,initrd-end = <0x00 {plan.initrd_addr + len(initrd):#x}>;" in dts
    assert "reg = <0x00 0x40000000 0x00 0x10000000>;" in dts          # 256 MiB at 1 GiB
    assert dts.count('enable-method = "psci";') == 3
    assert 'method = "hvc";' in dts
    assert 'compatible = "arm,gic-v3";' in dts
    assert "interrupts = <0x00 0x10 0x01>;" in dts and "virtio_mmio@a000200" in dts
    assert 'stdout-path = "/pl011@9000000";' in dts
    # The power button: KEY_POWER on the PL061's line 3, as QEMU's virt wires it.
    assert "linux,code = <0x74>;" in dts and "gpios = <0x03 0x03 0x00>;" in dts and "gpio-controller;" in dts


def test_device_tree_of_a_gicv2_host(mem: GuestMemory) -> None:
    """Where the host's GIC is a v2: its distributor and CPU interface, and the timer's PPIs
    going to every vCPU (QEMU virt's for gic-version=2)."""
    plan = boot.prepare(mem, _image(), "", None, 2, boot.Firmware((), GICV2))
    dts = _dts(mem.read(plan.fdt_addr, layout.FDT_MAX_SIZE))
    assert 'compatible = "arm,cortex-a15-gic";' in dts and "gic-v3" not in dts
    assert "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x8010000 0x00 0x10000>;" in dts
    assert "interrupts = <0x01 0x0d 0x304 0x01 0x0e 0x304 0x01 0x0b 0x304 0x01 0x0a 0x304>;" in dts


def test_mpidrs_follow_kvm_clusters_of_sixteen() -> None:
    assert [boot.mpidr(i) for i in (0, 1, 15, 16, 17, 255, 256)] == \
        [0, 1, 15, 0x100, 0x101, 0xF0F, 0x1000]


def test_redistributors_past_the_low_region() -> None:
    assert layout.redist_regions(2, 0x8000_0000) == [(0x080A_0000, 0x4_0000)]
    low, high = layout.redist_regions(254, (1 << 30) + (3 << 30) + 5)
    assert low == (0x080A_0000, 123 * 0x2_0000)
    assert high == (5 << 30, (254 - 123) * 0x2_0000)


@pytest.mark.parametrize("image, message", [
    (b"MZ" + bytes(100), "not an arm64 Image"),
    (bytes(0x202) + b"HdrS" + bytes(100), "is an x86 bzImage .* an aarch64 host boots arm64 kernels"),
    (b"\x1f\x8b" + bytes(100), "does not decompress"),
    (bytes(10), "too short"),
    (_image(image_size=300 * MiB), "need about"),
])
def test_bad_kernels_are_refused(mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(boot.KernelError, match=message):
        boot.prepare(mem, image, "", None, 1, boot.Firmware((), GICV3))


def test_too_long_a_command_line_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(boot.KernelError, match="accepts at most 2047"):
        boot.prepare(mem, _image(), "x" * 2048, None, 1, boot.Firmware((), GICV3))


def test_legacy_image_loads_at_half_a_mib(mem: GuestMemory) -> None:
    plan = boot.prepare(mem, _image(image_size=0), "", None, 1, boot.Firmware((), GICV3))
    assert plan.entry == layout.RAM_START + 0x80000 and plan.initrd_size == 0


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.out = bytearray()

    def __call__(self, level: bool) -> None:
        self.levels.append(level)


def test_pl011_identifies_itself_and_transmits() -> None:
    line = Line()
    u = pl011.Pl011(line.out.extend, line)
    ids = [u.read(0xFE0 + 4 * i, 4) for i in range(8)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]     # what the amba bus matches
    assert u.read(pl011.UARTFR, 4) & pl011.FR_RXFE and u.read(pl011.UARTFR, 4) & pl011.FR_TXFE
    u.write(pl011.UARTIMSC, 4, pl011.INT_TX)
    for b in b"ok\n":
        u.write(pl011.UARTDR, 4, b)
    assert bytes(line.out) == b"ok\n"
    assert line.levels == [True]                # transmitted: the TX interrupt stands until cleared
    u.write(pl011.UARTICR, 4, pl011.INT_TX)
    assert line.levels == [True, False]


def test_pl011_receive_interrupt_follows_the_fifo() -> None:
    line = Line()
    u = pl011.Pl011(None, line)
    u.write(pl011.UARTIMSC, 4, pl011.INT_RX | pl011.INT_RT)
    u.enqueue(b"ab")
    assert line.levels == [True]
    assert not u.read(pl011.UARTFR, 4) & pl011.FR_RXFE
    u.write(pl011.UARTICR, 4, pl011.INT_ALL)   # bytes still wait: the interrupt stays up
    assert line.levels == [True]
    assert [u.read(pl011.UARTDR, 4), u.read(pl011.UARTDR, 4)] == [ord("a"), ord("b")]
    assert line.levels == [True, False]
    assert u.read(pl011.UARTFR, 4) & pl011.FR_RXFE
    u.enqueue(b"x" * (pl011.RX_BUFFER_LIMIT + 10))
    received = 0
    while not u.read(pl011.UARTFR, 4) & pl011.FR_RXFE:
        u.read(pl011.UARTDR, 4)
        received += 1
    assert received == pl011.RX_BUFFER_LIMIT      # the rest was dropped, not queued without bound


def test_pl011_loopback_receives_what_it_sends() -> None:
    line = Line()
    u = pl011.Pl011(line.out.extend, line)
    u.write(pl011.UARTCR, 4, pl011.CR_RESET | pl011.CR_LBE)
    u.write(pl011.UARTDR, 4, 0x55)
    assert line.out == b"" and u.read(pl011.UARTDR, 4) == 0x55


def test_pl031_counts_host_seconds_and_keeps_the_guest_setting() -> None:
    rtc = pl031.Pl031()
    assert abs(rtc.read(pl031.RTCDR, 4) - time.time()) <= 1
    assert [rtc.read(0xFE0 + 4 * i, 4) for i in range(4)] == [0x31, 0x10, 0x14, 0x00]
    rtc.write(pl031.RTCLR, 4, 1_000_000)
    assert 1_000_000 <= rtc.read(pl031.RTCDR, 4) <= 1_000_001


def test_pl061_power_button_edges_reach_the_interrupt_line() -> None:
    """As Linux's gpio-pl061 sets a gpio-keys line up: both edges, interrupt enabled."""
    line = Line()
    gpio = pl061.Pl061(line)
    assert [gpio.read(0xFE0 + 4 * i, 4) for i in range(4)] == [0x61, 0x10, 0x04, 0x00]
    gpio.write(pl061.GPIOIBE, 4, 1 << 3)
    gpio.write(pl061.GPIOIE, 4, 1 << 3)
    gpio.set_line(3, True)
    assert line.levels == [True] and gpio.read(pl061.GPIOMIS, 4) == 1 << 3
    assert gpio.read(0x3FC, 4) == 1 << 3 and gpio.read(1 << 3 << 2, 4) == 1 << 3   # GPIODATA, masked
    gpio.write(pl061.GPIOIC, 4, 1 << 3)
    assert line.levels == [True, False]
    gpio.set_line(3, False)                 # the release is an edge too
    assert line.levels == [True, False, True] and gpio.read(0x3FC, 4) == 0


def test_pl061_level_interrupts_follow_the_line() -> None:
    line = Line()
    gpio = pl061.Pl061(line)
    gpio.write(pl061.GPIOIS, 4, 1)          # line 0 level-sensitive, high (GPIOIEV)
    gpio.write(pl061.GPIOIEV, 4, 1)
    gpio.write(pl061.GPIOIE, 4, 1)
    assert line.levels == []
    gpio.set_line(0, True)
    gpio.write(pl061.GPIOIC, 4, 1)          # clearing does not end a level that stands
    assert line.levels == [True]
    gpio.set_line(0, False)
    assert line.levels == [True, False]


# --- saved state: each board device as a snapshot keeps it ---
def uart(line: Line) -> pl011.Pl011:
    return pl011.Pl011(None, line)


def clock(line: Line) -> pl031.Pl031:
    return pl031.Pl031()


def gpio(line: Line) -> pl061.Pl061:
    return pl061.Pl061(line)


# The registers a guest writes, and those it reads back (not the data or time registers, whose
# reads consume input or follow the host's clock).
REGISTERS: dict[Callable[[Line], Any], tuple[Sequence[int], Sequence[int]]] = {
    uart: (range(0x04, 0x4C, 4), range(0x04, 0x4C, 4)),
    clock: (range(0x04, 0x20, 4), (pl031.RTCMR, pl031.RTCIMSC)),
    gpio: ((0x3FC, *range(0x400, 0x424, 4)), (0x3FC, *range(0x400, 0x424, 4)))}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), typed=st.binary(max_size=64), lines=st.integers(0, 0xFF))
@pytest.mark.parametrize("make", [uart, clock, gpio])
def test_board_device_round_trip(make: Callable[[Line], Any], data: st.DataObject, typed: bytes,
                                 lines: int) -> None:
    """What a restored device reads back, and the level it drives its interrupt line to, are the
    saved device's."""
    writable, readable = REGISTERS[make]
    device = make(Line())
    if isinstance(device, pl011.Pl011):
        device.enqueue(typed)
    for offset, value in data.draw(st.lists(st.tuples(st.sampled_from(writable), st.integers(0, 0xFFFF)),
                                            max_size=30)):
        device.write(offset, 4, value)
    if isinstance(device, pl061.Pl061):
        for n in range(8):
            device.set_line(n, bool(lines >> n & 1))
    saved = device.save()
    copy_line = Line()
    copy = make(copy_line)
    copy.restore(persist.from_json(type(saved), json.loads(json.dumps(persist.to_json(saved))), "state"))
    assert copy.save() == saved
    assert [copy.read(o, 4) for o in readable] == [device.read(o, 4) for o in readable]
    if not isinstance(copy, pl031.Pl031):
        masked = copy.read(pl011.UARTMIS if isinstance(copy, pl011.Pl011) else pl061.GPIOMIS, 4)
        assert copy_line.levels == ([True] if masked else [])


@pytest.mark.parametrize("make, change, problem", [
    (uart, {"cr": 0x10000}, "cr must be an integer from 0 to 65535"),
    (uart, {"rx": bytes(5000)}, "rx holds more than 4096 bytes"),
    (clock, {"imsc": 2}, "imsc must be an integer from 0 to 1"),
    (gpio, {"inputs": 0x100}, "inputs must be an integer from 0 to 255"),
])
def test_bad_board_device_state_changes_nothing(make: Callable[[Line], Any], change: dict[str, object],
                                                problem: str) -> None:
    line = Line()
    device = make(line)
    good = device.save()
    with pytest.raises(SavedStateError, match=problem):
        device.restore(dataclasses.replace(good, **change))
    assert device.save() == good and line.levels == []


def gic_state(cpus: int = 2) -> gicstate.GicState:
    cpu = gicstate.GicCpuState((0,) * 12, (0,) * 15, 0)    # IGROUPR0 ... IPRIORITYR7; SRE ... AP1R3
    return gicstate.GicState(3, (0,) * gicstate.LAYOUTS[3].dist_words, (0,) * 3, (cpu,) * cpus)


def test_gic_layout_covers_the_spis() -> None:
    """The distributor's SPI words (96 SPIs): a bit each in IGROUPR, ISENABLER, ISPENDR and
    ISACTIVER, two in ICFGR, eight in IPRIORITYR, 64 in IROUTER; and its CTLR."""
    v3, v2 = gicstate.LAYOUTS[3], gicstate.LAYOUTS[2]
    assert v3.dist_words == 1 + 3 + 6 + 192 + 3 * 3 + 24
    assert [b.offset for b in v3.dist_routing] == [0x0, 0x84, 0xC08, 0x6100]
    # A GICv2's targets: a byte an SPI (ITARGETSR), its SGIs' pending bits by source.
    assert v2.dist_words == 1 + 3 + 6 + 24 + 3 * 3 + 24 and v2.dist_routing[3].offset == 0x820
    assert v2.cpu_words == 1 + 3 + 8 + 4 and v2.cpu_state[-1].clear == -0x10
    assert [hex(r) for r in (gicstate.ICC_SRE_EL1, gicstate.ICC_CTLR_EL1, gicstate.ICC_AP0R[1],
                             gicstate.ICC_AP1R[0])] == ["0xc665", "0xc664", "0xc645", "0xc648"]
    gicstate.check_state(gic_state(), 3, 2)


@pytest.mark.parametrize("change, problem", [
    (lambda s: dataclasses.replace(s, dist=s.dist[:-1]), "distributor has the wrong size"),
    (lambda s: dataclasses.replace(s, spi_levels=(1 << 32, 0, 0)), "must be an integer from 0 to 4294967295"),
    (lambda s: dataclasses.replace(s, cpus=s.cpus[:1]), "1 GIC CPU interfaces saved; this VM has 2 vCPUs"),
    (lambda s: dataclasses.replace(s, version=2), "a GICv2 saved; this VM's is a GICv3"),
    (lambda s: dataclasses.replace(s, cpus=(dataclasses.replace(s.cpus[0], icc=(-1,) * 15), s.cpus[1])),
     "vCPU 0: a GIC CPU interface register must be an integer"),
])
def test_bad_gic_state_is_refused(change: Callable[[gicstate.GicState], gicstate.GicState],
                                  problem: str) -> None:
    with pytest.raises(SavedStateError, match=problem):
        gicstate.check_state(change(gic_state()), 3, 2)


def its_state(cpus: int = 2) -> itsstate.ItsState:
    return itsstate.ItsState((0,) * 13, ((0x4000_0000_0789, 0x4800_0000, 1),) * cpus)


@pytest.mark.parametrize("change, problem", [
    (lambda s: dataclasses.replace(s, regs=s.regs[:-1]), "the ITS's registers have the wrong size"),
    (lambda s: dataclasses.replace(s, redists=s.redists[:1]),
     "1 LPI redistributors saved; this VM has 2 vCPUs"),
    (lambda s: dataclasses.replace(s, redists=((1 << 64, 0, 1), s.redists[1])),
     "vCPU 0: an LPI register must be an integer"),
    (lambda s: dataclasses.replace(s, regs=(-1, *s.regs[1:])), "an ITS register must be an integer"),
])
def test_bad_its_state_is_refused(change: Callable[[itsstate.ItsState], itsstate.ItsState],
                                  problem: str) -> None:
    itsstate.check_state(its_state(), 2)
    with pytest.raises(SavedStateError, match=problem):
        itsstate.check_state(change(its_state()), 2)


def test_snapshot_from_before_the_its_reads_as_one_without() -> None:
    """A "kvm" section saved before AltoVirt made ITSs has no "its": read as a VM without one."""
    saved = persist.to_json(poweron.VmState(gic_state(), 7, its_state()))
    del saved["its"]
    assert persist.from_json(poweron.VmState, saved, "kvm.vm") == poweron.VmState(gic_state(), 7)


@pytest.mark.parametrize("saved, problem", [
    ({"target": 5, "midr": 0x410FD034, "gic": 2}, "saved with a GICv2; this host's is a GICv3"),
    ({"target": 5, "midr": 0x410FD083, "gic": 3}, "saved on a CPU with MIDR_EL1 0x410fd083 .KVM target 5.; "
     "this host's is 0x410fd034 .target 5."),
    ({"target": 5}, "the host CPU is not recorded"),
    (None, "the host CPU is not recorded"),
])
def test_snapshot_from_another_kind_of_host_is_refused(saved: object, problem: str) -> None:
    here = {"target": 5, "midr": 0x410FD034, "gic": 3}
    poweron.check_cpu(dict(here), here)
    with pytest.raises(SavedStateError, match=problem):
        poweron.check_cpu(saved, here)


def test_device_tree_of_a_pci_machine() -> None:
    """The GICv3's ITS and the generic ECAM host bridge, read back by dtc: MSIs to the ITS,
    slot 0's INTA# on SPI 3 (with the GIC node's two address cells); on a GICv2 host no ITS,
    no msi-map, and INTx entries without address cells."""
    from altovirt.arch.aarch64 import fdt
    its = gic.Gic(3, GICV3.regions, (layout.GIC_ITS_BASE, layout.GIC_ITS_SIZE))
    regions = layout.ram_regions(256 * MiB)
    pci = layout.pci_layout(regions)
    dts = _dts(fdt.build(fdt.DeviceTreeInputs(regions, [0], "", None, (), its, pci)))
    assert 'compatible = "arm,gic-v3-its";' in dts and "msi-controller;" in dts
    assert "pcie@3f000000" in dts and 'compatible = "pci-host-ecam-generic";' in dts
    assert "bus-range = <0x00 0x0f>;" in dts and "msi-map = <0x00 0x04 0x00 0x10000>;" in dts
    assert "ranges = <0x2000000 0x00 0x10000000 0x00 0x10000000 0x00 0x2eff0000" in dts
    assert "interrupt-map = <0x00 0x00 0x00 0x01 0x01 0x00 0x00 0x00 0x03 0x04" in dts
    dts = _dts(fdt.build(fdt.DeviceTreeInputs(regions, [0], "", None, (), GICV2, pci)))
    assert "its@" not in dts and "msi-map" not in dts
    assert "interrupt-map = <0x00 0x00 0x00 0x01 0x01 0x00 0x03 0x04" in dts
