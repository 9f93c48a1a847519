"""WIP: PCI on arm64 (-machine virt): Debian's arm64 kernel finds the generic ECAM host bridge
in the device tree, binds virtio-pci to each function, and takes its MSI-X vectors through
the GICv3's ITS; a disk by hash and a NIC's ping prove the queues and their interrupts."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..linux.conftest import GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv
from ..linux.test_devices import Machine
from ..testbed import debian, guest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("pci-arm64")
    (d / "disk.img").write_bytes(os.urandom(4 << 20))
    ns = Netns("tap0")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    argv = altovirt_argv(
        kernel, initrd, "-machine", "virt", "-smp", "2", "-m", "512M",
        "-drive", f"id=d0,file={d / 'disk.img'},if=none",
        "-device", "virtio-blk-pci,drive=d0,id=vda,addr=0x3",
        "-netdev", "tap,id=n0,ifname=tap0", "-device", "virtio-net-pci,netdev=n0,id=net0,addr=0x4",
        "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX}")
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    try:
        g.wait_ready(400)
        m = Machine(g, Qmp(d / "qmp.sock"), ns, d)
        yield m
        with contextlib.suppress(Exception):
            m.qmp.close()
    finally:
        g.close()
        ns.close()


def test_functions_on_the_its(vm: Machine) -> None:
    found = vm.g.check("ls /sys/bus/pci/devices").split()
    assert "0000:00:03.0" in found and "0000:00:04.0" in found, found
    interrupts = vm.g.check("cat /proc/interrupts")
    assert "ITS" in interrupts and "virtio0-req.0" in interrupts, interrupts


def test_disk_and_nic(vm: Machine) -> None:
    expected = hashlib.md5((vm.dir / "disk.img").read_bytes()).hexdigest()
    assert vm.g.check("md5sum < /dev/vda", timeout=120).split()[0] == expected
    vm.g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
