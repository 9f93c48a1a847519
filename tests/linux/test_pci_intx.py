"""INTx under Linux: Debian booted with pci=nomsi on -machine q35 has no MSI or MSI-X, so
every function interrupts through its INTA# on the IOAPIC, as the DSDT's _PRT routes it, a
level the VMM holds until the driver reads the ISR and raises again after the EOI if it
must. A disk read by hash, vhost-net (its calls raised by the VMM on INTA#, as QEMU does
without MSI-X) with ping and TCP both ways, and a disk hot-plugged into a root port whose
pciehp events come on INTA# too, then unplugged. (Without MSI, Linux does not ask _OSC for
native hot-plug, so the guest takes it with pcie_ports=native.)"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv
from .test_devices import Machine, ping_and_tcp_both_ways

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("intx")
    (d / "disk.img").write_bytes(os.urandom(4 << 20))
    ns = Netns("tap0")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    argv = altovirt_argv(
        kernel, initrd, "-machine", "q35", "-smp", "2", "-m", "512M",
        "-drive", f"id=d0,file={d / 'disk.img'},if=none",
        "-device", "virtio-blk-pci,drive=d0,id=vda,addr=0x3",
        "-netdev", "tap,id=n0,ifname=tap0,vhost=on", "-device", "virtio-net-pci,netdev=n0,id=net0,addr=0x4",
        "-device", "pcie-root-port,id=rp1,addr=0x5,slot=1",
        "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX} pci=nomsi pcie_ports=native")
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    try:
        g.wait_ready(BOOT_TIMEOUT)
        m = Machine(g, Qmp(d / "qmp.sock"), ns, d)
        yield m
        with contextlib.suppress(Exception):
            m.qmp.close()
    finally:
        g.close()
        ns.close()


def intx_lines(vm: Machine) -> list[str]:
    """/proc/interrupts' lines of IOAPIC pins 16 to 19 (the _PRT's), fasteoi (level)."""
    return [ln for ln in vm.g.check("cat /proc/interrupts").splitlines()
            if re.search(r"IO-APIC\s+1[6-9]-fasteoi", ln)]


def test_every_function_on_its_inta(vm: Machine) -> None:
    interrupts = vm.g.check("cat /proc/interrupts")
    assert "PCI-MSI" not in interrupts, interrupts
    lines = intx_lines(vm)
    assert any("virtio0" in ln for ln in lines) and any("virtio1" in ln for ln in lines), interrupts
    assert any("pciehp" in ln for ln in lines), interrupts
    expected = hashlib.md5((vm.dir / "disk.img").read_bytes()).hexdigest()
    assert vm.g.check("md5sum < /dev/vda", timeout=120).split()[0] == expected


def test_vhost_net_over_inta(vm: Machine) -> None:
    ping_and_tcp_both_ways(vm, HOST_IP, GUEST_IP, 5061)
    assert "vhost-net serves the queues" in (vm.dir / "vmm.log").read_text()


def test_hot_plug_with_pciehp_on_inta(vm: Machine) -> None:
    data = os.urandom(1 << 20)
    (vm.dir / "hot.img").write_bytes(data)
    vm.qmp.ok("blockdev-add", **{"node-name": "hot", "driver": "raw",
                                 "file": {"driver": "file", "filename": str(vm.dir / "hot.img")}})
    vm.qmp.ok("device_add", driver="virtio-blk-pci", id="hot", bus="rp1")
    path = "/sys/bus/pci/devices/0000:01:00.0/virtio*/block"
    vm.g.wait_until(f"ls {path} >/dev/null 2>&1", "the hot-plugged disk")
    disk = vm.g.check(f"ls {path}").strip()
    assert vm.g.check(f"md5sum < /dev/{disk}", timeout=120).split()[0] == hashlib.md5(data).hexdigest()
    vm.qmp.ok("device_del", id="hot")
    assert vm.qmp.event("DEVICE_DELETED", 60)["data"] == {"device": "hot", "path": "hot"}
    vm.g.wait_until(f"! test -e /dev/{disk}", "the disk gone")
