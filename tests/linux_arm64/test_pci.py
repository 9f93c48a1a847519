"""PCI on arm64 (-machine virt): Debian's arm64 kernel finds the generic ECAM host bridge in
the device tree, binds virtio-pci to each function and takes its MSI-X vectors through the
GICv3's ITS (on a host whose GIC is a v2, which has no ITS, its INTx lines); a disk by hash
and a NIC's ping prove the queues and their interrupts, before and after a snapshot's
restore in a new process and a live migration to a third, which carry the ITS's tables in
guest RAM, with a disk hot-plugged into a root port across both; then a reset, and
altovirt-firecracker --enable-pci."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..linux.conftest import ARCH, FIRECRACKER, GUEST_IP, HOST_IP, PREFIX, Qmp, altovirt_argv
from ..linux.test_devices import Machine
from ..linux.test_pci import (
    ARGV,
    host_side,
    hot_disk,
    in_slot,
    migrate_live_to_a_new_process,
    restore_in_a_new_process,
)
from ..testbed import debian, guest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("pci-arm64")
    (d / "disk.img").write_bytes(os.urandom(4 << 20))
    ns = host_side()
    argv = ARGV[d] = altovirt_argv(
        kernel, initrd, "-machine", "virt", "-smp", "2", "-m", "512M",
        "-drive", f"id=d0,file={d / 'disk.img'},if=none",
        "-device", "virtio-blk-pci,drive=d0,id=vda,addr=0x3",
        "-netdev", "tap,id=n0,ifname=tap0", "-device", "virtio-net-pci,netdev=n0,id=net0,addr=0x4",
        "-device", "pcie-root-port,id=rp1,addr=0x6,slot=1,chassis=1",
        "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX}")
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    m = None
    try:
        g.wait_ready(400)
        m = Machine(g, Qmp(d / "qmp.sock"), ns, d)
        yield m
        with contextlib.suppress(Exception):
            m.qmp.close()
    finally:
        (m.g if m else g).close()                  # the VM's last process and namespace
        (m.ns if m else ns).close()


# The host's GIC (this bed's L1): a GICv3's KVM gives the guest an ITS, a GICv2's cannot.
HOST_GICV3 = "GICv3" in Path("/proc/interrupts").read_text()


def disk_interrupts(g: guest.LinuxGuest) -> int:
    """The interrupts the disk's request queue has had: its MSI-X vector's through the ITS,
    or the function's INTx line's."""
    name = "virtio0-req.0" if HOST_GICV3 else "virtio0"
    line = next(ln for ln in g.check("cat /proc/interrupts").splitlines() if ln.endswith(name))
    return sum(int(n) for n in line.split()[1:3])


def test_functions_and_their_interrupts(vm: Machine) -> None:
    found = vm.g.check("ls /sys/bus/pci/devices").split()
    assert "0000:00:03.0" in found and "0000:00:04.0" in found, found
    interrupts = vm.g.check("cat /proc/interrupts")
    if HOST_GICV3:
        assert "ITS-MSI" in interrupts and "virtio0-req.0" in interrupts, interrupts
    else:
        assert "ITS" not in interrupts and "virtio0" in interrupts, interrupts


def disk_and_nic(vm: Machine) -> None:
    """The disk read whole (past the page cache) by hash, its interrupts counted going up, and
    a ping."""
    expected = hashlib.md5((vm.dir / "disk.img").read_bytes()).hexdigest()
    before = disk_interrupts(vm.g)
    vm.g.check("echo 3 > /proc/sys/vm/drop_caches")
    assert vm.g.check("md5sum < /dev/vda", timeout=120).split()[0] == expected
    assert disk_interrupts(vm.g) > before
    vm.g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)


def test_disk_and_nic(vm: Machine) -> None:
    disk_and_nic(vm)


def hot_disk_read(vm: Machine) -> None:
    """The disk in the root port's slot, read whole (past the page cache) by hash."""
    disk = in_slot(vm, 1, "block")
    vm.g.check("echo 3 > /proc/sys/vm/drop_caches")
    expected = hashlib.md5((vm.dir / "hot1.img").read_bytes()).hexdigest()
    assert vm.g.check(f"md5sum < /dev/{disk}", timeout=120).split()[0] == expected


def test_hot_plug_into_a_root_port(vm: Machine) -> None:
    """Linux's pciehp, with no ACPI to grant it, takes the root port's slot: a disk device_add
    puts there is found and read by hash."""
    dmesg = vm.g.check("dmesg | grep pciehp")
    assert re.search(r"pcieport 0000:00:06\.0: pciehp: Slot #1 AttnBtn\+ PwrCtrl\+.*HotPlug\+", dmesg), dmesg
    hot_disk(vm, "hot1")
    vm.qmp.ok("device_add", driver="virtio-blk-pci", id="hot1", bus="rp1")
    hot_disk_read(vm)
    # The VM's next processes take it in with the port it is in (QEMU's rule).
    ARGV[vm.dir] += ["-drive", f"id=hot1,file={vm.dir / 'hot1.img'},if=none",
                     "-device", "virtio-blk-pci,drive=hot1,id=hot1,bus=rp1"]


def test_snapshot_restore_and_live_migration(vm: Machine) -> None:
    """The ITS's tables (which device's MSI goes to which LPI and vCPU) and the LPIs' state go
    with a snapshot and a live migration: the functions' interrupts still arrive after each,
    the hot-plugged disk's too (its MSIs carry the bus number the guest gave its port)."""
    restore_in_a_new_process(vm)
    disk_and_nic(vm)
    hot_disk_read(vm)
    migrate_live_to_a_new_process(vm)
    disk_and_nic(vm)
    hot_disk_read(vm)


def test_unplug_from_the_migrated_vms_root_port(vm: Machine) -> None:
    """device_del presses the slot's button; pciehp lets the disk go and DEVICE_DELETED follows."""
    disk = in_slot(vm, 1, "block")
    vm.qmp.ok("device_del", id="hot1")
    assert vm.qmp.event("DEVICE_DELETED", 60)["data"] == {"device": "hot1", "path": "hot1"}
    vm.g.wait_until(f"! test -e /dev/{disk}", "the disk gone")
    vm.qmp.ok("blockdev-del", **{"node-name": "hot1"})


def test_reset_boots_linux_again_on_its_functions(vm: Machine) -> None:
    """A machine reset empties the ITS and turns the LPIs off: Linux, booted again from the
    start, maps its vectors afresh and its functions' interrupts arrive."""
    vm.qmp.ok("system_reset")
    assert vm.qmp.event("RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    vm.g.wait_ready(400)
    assert float(vm.g.check("cut -d' ' -f1 /proc/uptime")) < 400
    if HOST_GICV3:       # Linux 6.1's words for redistributors a reset left as they were
        lpis = vm.g.check("dmesg | grep LPI")
        assert "using allocated LPI pending table" in lpis and "Booted with LPIs enabled" not in lpis, lpis
    disk_and_nic(vm)


def test_firecracker_enable_pci(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    """altovirt-firecracker --enable-pci: Firecracker's JSON configuration's disk is a PCI
    function, read whole by hash."""
    (tmp_path / "disk.img").write_bytes(os.urandom(1 << 20))
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel.vmlinuz), "initrd_path": str(initrd),
                        "boot_args": ARCH.guest_append},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "data", "path_on_host": str(tmp_path / "disk.img"),
                    "is_root_device": False, "is_read_only": True}]}))
    g = guest.LinuxGuest([*FIRECRACKER, "--no-api", "--config-file", str(config), "--enable-pci",
                          "--log-path", str(tmp_path / "vmm.log")], log_path=tmp_path / "serial.log")
    try:
        g.wait_ready(400)
        assert g.check("readlink /sys/block/vda/device/../driver").strip().endswith("virtio-pci")
        expected = hashlib.md5((tmp_path / "disk.img").read_bytes()).hexdigest()
        assert g.check("md5sum < /dev/vda", timeout=120).split()[0] == expected
        assert g.poweroff(120) == 0
    finally:
        g.close()
