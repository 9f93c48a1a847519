"""The reference: QEMU microvm (ACPI on) boots the same kernel and initramfs on the same KVM,
with a disk and a NIC, and Linux uses both; so a failure under AltoVirt is AltoVirt's."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, qemu_argv

pytestmark = pytest.mark.timeout(900)


def test_qemu_microvm_boots_with_disk_and_net(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.txt").write_text("reference\n")
    guest.make_ext4(tmp_path / "disk.img", "32M", tmp_path / "src")
    ns = Netns("tap0")
    try:
        ns.address("tap0", f"{HOST_IP}/{PREFIX}")
        argv = qemu_argv(kernel, initrd, "-drive", f"id=d0,file={tmp_path / 'disk.img'},format=raw,if=none",
                         "-device", "virtio-blk-device,drive=d0,serial=ref-0",
                         "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                         "-device", "virtio-net-device,netdev=n0", cpus=2,
                         append=f"guest.ip={GUEST_IP}/{PREFIX}")
        with guest.LinuxGuest([*ns.prefix, *argv], log_path=tmp_path / "serial.log") as g:
            g.wait_ready(400)
            assert g.check("nproc").strip() == "2"
            assert g.check("cat /sys/block/vda/serial").strip() == "ref-0"
            assert g.check("mount /dev/vda /mnt && cat /mnt/hello.txt && umount /mnt") == "reference\n"
            g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=60)
            # Not reboot: QEMU microvm's reboot loops in the nested test bed.
            assert g.poweroff(120) == 0
    finally:
        ns.close()
