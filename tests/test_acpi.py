"""ACPI: the tables a guest finds in RAM, checked with ACPICA's own tools (Debian's
acpica-tools), found by the probe as Linux finds them, and the hardware-reduced
power button and soft-off path driven by QMP system_powerdown; the same tables as
before the devices described themselves (issue 24), and arch apart from devices."""

from __future__ import annotations

import ast
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import cast

import pytest

import altovirt
from altovirt import arch
from altovirt.arch.x86_64 import layout
from altovirt.config import VmConfig, load_config
from altovirt.devices.legacy.i8042 import I8042
from altovirt.devices.virtio.block import WorkerPool
from altovirt.eventloop import EventLoop
from altovirt.kvm import Vm as KvmVm
from altovirt.memory import GuestMemory
from altovirt.vmm import builder, virtio_devices
from altovirt.vmm.device_manager import DeviceManager

from .conftest import Vm, needs_kvm
from .test_qmp import Raw

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="SKIPPED LOUDLY: iasl (Debian acpica-tools) is "
                                                      "missing; run ./scripts/setup")


def tables_in_ram(area: bytes) -> dict[str, bytes]:
    """Walk RSDP -> XSDT -> tables -> DSDT in the ACPI area, as an OS does."""
    def at(addr: int, length: int) -> bytes:
        off = addr - layout.ACPI_START
        assert off >= 0 and off + length <= len(area), f"{addr:#x}+{length} is outside the ACPI area"
        return area[off:off + length]

    def table(addr: int) -> bytes:
        return at(addr, struct.unpack_from("<I", at(addr, 8), 4)[0])

    rsdp = area[:36]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36
    found = {"RSDP": rsdp}
    xsdt = table(struct.unpack_from("<Q", rsdp, 24)[0])
    found["XSDT"] = xsdt
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(addr)
        found[t[:4].decode()] = t
    fadt = found["FACP"]
    dsdt32, = struct.unpack_from("<I", fadt, 40)
    xdsdt, = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == xdsdt
    found["DSDT"] = table(xdsdt)
    return found


def iasl(tmp_path: Path, name: str, data: bytes) -> str:
    """Disassemble one table; assert ACPICA reports nothing wrong; return the .dsl text."""
    assert IASL is not None
    path = tmp_path / f"{name.lower()}.dat"
    path.write_bytes(data)
    p = subprocess.run([IASL, "-d", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not re.search(r"error|warning|invalid|incorrect", p.stdout + p.stderr, re.I), p.stdout + p.stderr
    dsl = path.with_suffix(".dsl").read_text()
    assert not re.search(r"\*\*\*\*|incorrect|invalid|error", dsl, re.I), dsl
    return dsl


def check_tables(tmp_path: Path, tables: dict[str, bytes], cpus: int,
                 slots: list[tuple[int, int]]) -> None:
    for name in ("XSDT", "FACP", "APIC", "DSDT"):
        assert sum(tables[name]) % 256 == 0, f"{name} checksum"
    facp = iasl(tmp_path, "FACP", tables["FACP"])
    assert re.search(r"Hardware Reduced \(V5\) : 1", facp)
    assert re.search(r"Reset Register Supported \(V2\) : 1", facp)
    assert re.search(r"Sleep Control Register : \[Generic Address Structure\]", facp)
    madt = iasl(tmp_path, "APIC", tables["APIC"])
    assert len(re.findall(r"Subtable Type : 00 \[Processor Local APIC\]", madt)) == cpus
    assert re.search(r"Address : FEC00000", madt)
    iasl(tmp_path, "XSDT", tables["XSDT"])
    dsl = iasl(tmp_path, "DSDT", tables["DSDT"])
    devices = re.findall(r'"LNRO0005"\).*?Memory32Fixed \(ReadWrite,\s+0x(\w+),.*?\{\s+0x(\w+),',
                         dsl, re.S)
    assert [(int(a, 16), int(i, 16)) for a, i in devices] == slots
    assert dsl.count('"ACPI0007"') == cpus
    for hid in ("PNP0501", "PNP0303", "PNP0B00", "PNP0C0C"):
        assert f'EisaId ("{hid}")' in dsl
    assert '"ACPI0013"' in dsl and "Method (_EVT, 1, Serialized)" in dsl and "Name (_S5, Package" in dsl
    # The VM generation ID: what Linux's vmgenid driver binds to, and where the GUID is.
    assert re.search(r'Name \(_CID, "VM_Gen_Counter"\).*Name \(ADDR, Package \(0x02\)\s+\{\s+0x000EF000,\s+'
                     r'(Zero|0x00000000)', dsl, re.S), dsl
    assert "Notify (\\_SB.VGEN, 0x80)" in dsl
    compiles_back(tmp_path, dsl, tables["DSDT"])


def compiles_back(tmp_path: Path, dsl: str, dsdt: bytes) -> None:
    """ACPICA compiles its own disassembly ``dsl`` back to the very same AML as ``dsdt``
    (-oa: as written, no optimizations), so nothing in our encoding is ambiguous or lost."""
    (tmp_path / "dsdt.dsl").write_text(dsl)
    assert IASL is not None
    p = subprocess.run([IASL, "-oa", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "0 Errors, 0 Warnings" in p.stdout, p.stdout + p.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


BEFORE = Path(__file__).parent / "data" / "acpi-before-issue24.hex"


def tables_before() -> dict[int, bytes]:
    """The ACPI area as AltoVirt built it before issue 24, by number of virtio-mmio slots."""
    cases: dict[int, str] = {}
    slots = 0
    for line in BEFORE.read_text().splitlines():
        if line.startswith("slots="):
            slots = int(line.removeprefix("slots="))
            cases[slots] = ""
        elif line and not line.startswith("#"):
            cases[slots] += line
    return {n: bytes.fromhex(text) for n, text in cases.items()}


def _pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """The PkgLength at ``at`` (ACPI 6.4, 20.2.4): what it encodes (its own bytes included),
    and how many bytes it takes."""
    extra = data[at] >> 6
    if not extra:
        return data[at] & 0x3F, 1
    return (data[at] & 0x0F) | int.from_bytes(data[at + 1:at + 1 + extra], "little") << 4, 1 + extra


def sb_devices(dsdt: bytes) -> tuple[bytes, list[bytes], bytes]:
    """The DSDT cut into what comes before \\_SB's Device terms, each of them, and what follows."""
    assert dsdt[36] == 0x10                                 # ScopeOp
    length, size = _pkg_length(dsdt, 37)
    end, at = 37 + length, 37 + size + 5                    # past \\_SB_
    head, devices = dsdt[:at], []
    while at < end:
        assert dsdt[at:at + 2] == b"\x5b\x82"                # DeviceOp
        length, _ = _pkg_length(dsdt, at + 2)
        devices.append(dsdt[at:at + 2 + length])
        at += 2 + length
    assert at == end
    return head, devices, dsdt[end:]


def device_name(term: bytes) -> str:
    return term[2 + _pkg_length(term, 2)[1]:][:4].decode()


class NoKvm:
    """What the legacy devices ask of a VM: irqfds, here going nowhere."""

    def irqfd(self, fd: int, gsi: int) -> None:
        pass


def device_firmware(slots: int, acpi_on: bool = True) -> arch.FirmwareDevices:
    """What the device manager hands the firmware for its legacy devices and ``slots``
    virtio-mmio slots, made without KVM."""
    mem = GuestMemory(layout.ram_regions(128 << 20))
    dm = DeviceManager(VmConfig(acpi=acpi_on), cast(KvmVm, NoKvm()), mem, cast(EventLoop, None),
                       cast(WorkerPool, None), lambda reason: None, lambda event, data: None)
    try:
        dm.add_legacy_devices()
        dm.slots = [virtio_devices.slot(i) for i in range(slots)]
        return dm.firmware_devices()
    finally:
        dm.close()
        mem.close()


def check_as_before(area: bytes, before: bytes) -> None:
    """The tables in ``area`` are ``before``'s but for the order of \\_SB's devices: the
    processors come first now, and the VM generation ID before the power button."""
    now, then = tables_in_ram(area), tables_in_ram(before)
    assert area[len(before):].strip(b"\0") == b""
    for name in ("RSDP", "XSDT", "FACP", "APIC"):
        assert now[name] == then[name], name
    head, devices, tail = sb_devices(now["DSDT"])
    assert (head, tail) == sb_devices(then["DSDT"])[::2]     # length and checksum too
    assert sorted(devices) == sorted(sb_devices(then["DSDT"])[1])
    names = [device_name(d) for d in devices]
    cpus = [n for n in names if n.startswith("C0")]
    slots = [n for n in names if n.startswith("V0")]
    assert names == [*cpus, "COM1", "PS2K", "RTC_", *slots, "VGEN", "PWRB", "GED_"]


@pytest.mark.parametrize("slots", [11, 12])
def test_tables_as_before_the_devices_described_themselves(slots: int) -> None:
    firmware = arch.build_firmware(4, device_firmware(slots))
    assert firmware.acpi is not None and firmware.reset == I8042.reset_register
    check_as_before(firmware.acpi.image, tables_before()[slots])


def test_acpi_off_builds_no_tables() -> None:
    firmware = arch.build_firmware(2, device_firmware(12, acpi_on=False))
    assert firmware.acpi is None and firmware.reset == I8042.reset_register


def _imports(path: Path, root: Path) -> list[str]:
    """Every module and name ``path`` imports, absolute (``altovirt.arch.x86_64.acpi``)."""
    package = list(path.relative_to(root.parent).with_suffix("").parts)
    if package[-1] != "__init__":
        package.pop()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], node.module or ""]).strip(".") \
                if node.level else node.module or ""
            found += [base, *(f"{base}.{a.name}" for a in node.names)]
    return found


def test_arch_and_devices_are_apart_and_vmm_sees_one_interface() -> None:
    """arch/ assembles what the devices hand it and imports nothing of devices/; the devices
    import nothing of arch/; everything else takes arch only as ``altovirt.arch``'s names."""
    root = Path(altovirt.__file__).parent
    for path in root.rglob("*.py"):
        imported = _imports(path, root)
        where = path.relative_to(root).parts[0]
        if where == "arch":
            assert not [m for m in imported if m.startswith("altovirt.devices")], path
        elif where == "devices":
            assert not [m for m in imported if m.startswith("altovirt.arch")], path
        else:
            inside = [m for m in imported if m.startswith("altovirt.arch.")]
            assert all(m.removeprefix("altovirt.arch.") in arch.__all__ for m in inside), (path, inside)


@needs_kvm
@needs_iasl
def test_tables_in_guest_ram_pass_acpica(probe: Path, tmp_path: Path) -> None:
    """Every slot a VM with QMP has (6 disks, 2 NICs, console, vsock, rng) is in the DSDT, and
    the tables are those from before the devices described themselves."""
    m = builder.build(load_config([
        "-kernel", str(probe / "probe.elf"), "-smp", "4", "-m", "5G",
        "-api-channel", f"unix:{tmp_path / 'qmp.sock'}", "-chardev", f"id=c0,path={tmp_path / 'con'}",
        "-device", f"vsock,id=v0,guest-cid=3,uds-path={tmp_path / 'v.sock'}", "-device", "virtio-rng"]))
    try:
        assert m.mem is not None
        area = m.mem.read(layout.ACPI_START, layout.ACPI_SIZE)
        slots = [(0xD0000000 + 0x1000 * i, irq) for i, irq in enumerate((5, 6, 7, 9, 10, 11, 12, 13, 14,
                                                                         15, 16))]
    finally:
        m.close()
    check_tables(tmp_path, tables_in_ram(area), 4, slots)
    check_as_before(area, tables_before()[11])


@needs_iasl
def test_tables_for_254_vcpus_fit_and_pass_acpica(tmp_path: Path) -> None:
    built = arch.build_firmware(254, device_firmware(12)).acpi
    assert built is not None and len(built.image) <= layout.ACPI_SIZE
    slots = [virtio_devices.slot(i) for i in range(12)]
    check_tables(tmp_path, tables_in_ram(built.image), 254, [(s.base, s.irq) for s in slots])


@needs_kvm
@pytest.mark.parametrize("image", ["probe.elf", "probe.bzImage"])
def test_guest_finds_the_tables_where_linux_looks(probe: Path, image: str, vms: list[Vm]) -> None:
    """The RSDP in the BIOS area is the one the zero page (bzImage) or PVH start info names."""
    v = Vm("-kernel", str(probe / image), "-smp", "3", "-append", "probe.run=acpi", "-serial", "stdio",
           "-device", "virtio-rng")
    vms.append(v)
    assert v.line("probe: acpi rsdp=") == \
        "probe: acpi rsdp=0xe0000 boot-rsdp=0xe0000 revision=2 extended-checksum=ok"
    summary = v.line("probe: acpi fadt ")
    assert summary == ("probe: acpi fadt hw-reduced=1 sleep-space=1 sleep-port=0x600 madt-cpus=3 "
                       "dsdt-virtio=1 checksums=ok")
    v.wait_line("probe: test acpi ok")
    assert v.finish()[0] == 0


@needs_kvm
def test_acpi_off_leaves_only_the_mp_table(probe: Path, vms: list[Vm]) -> None:
    v = Vm("-kernel", str(probe / "probe.elf"), "-smp", "2", "-append", "probe.run=smp,acpi",
           "-serial", "stdio", "-machine", "microvm,acpi=off")
    vms.append(v)
    v.wait_line("probe: mptable addr=0x9fc00")
    v.wait_line("probe: test smp ok")
    v.wait_line("probe: acpi no rsdp")
    assert v.finish()[0] == 0


@needs_kvm
def test_system_powerdown_presses_the_acpi_power_button(probe: Path, tmp_path: Path,
                                                        vms: list[Vm]) -> None:
    """The guest sees the button on the GED's event register and powers off through
    the FADT's sleep control register: a clean guest shutdown, exit 0."""
    sock = tmp_path / "qmp.sock"
    v = Vm("-kernel", str(probe / "probe.bzImage"), "-append", "probe.run=acpi-power", "-serial", "stdio",
           "-api-channel", f"unix:{sock}")
    vms.append(v)
    v.wait_line("probe: acpi-power waiting ged-port=0x603")
    raw = Raw(sock)
    assert raw.call({"execute": "query-status"})["return"]["status"] == "running"   # no event yet
    raw.send(b'{"execute": "system_powerdown"}')
    # The guest may power off before the command's answer is sent: events and the answer
    # interleave as QMP allows; POWERDOWN still comes first, and SHUTDOWN after it.
    messages = [raw.recv() for _ in range(3)]
    assert {"return": {}} in messages
    events = [m for m in messages if "event" in m]
    assert [e["event"] for e in events] == ["POWERDOWN", "SHUTDOWN"]
    assert events[1]["data"] == {"guest": True, "reason": "guest-shutdown"}
    v.wait_line("probe: acpi-power button slp-typ=5")
    raw.close()
    status, _ = v.finish()
    assert status == 0
    assert "probe: acpi-power still running after S5" not in v.seen
