"""The arm64 test bed's L1 itself (scripts/testbed --arch aarch64), checked from inside: what
the VMM and these tests need there. /dev/kvm's API version, a VM with an in-kernel GICv3 (KVM
at EL2, VHE), Debian's pylibfdt, the repository and its test tools importable with Debian's
python3, and the guest's assets at the host's paths."""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..conftest import ROOT
from ..testbed import arch, debian
from .assets import check_guest_assets

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CREATE_DEVICE = 0xC00CAEE0      # _IOWR(KVMIO, 0xe0, struct kvm_create_device)
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_CREATE_DEVICE_TEST = 1


class _CreateDevice(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def test_kvm_api_version() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    finally:
        os.close(fd)


def test_kvm_vm_with_a_gicv3() -> None:
    """A VM (the default 40-bit IPA space) can have an in-kernel GICv3: L1's KVM runs at EL2
    with the virtualization extension of QEMU's GICv3."""
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        try:
            dev = _CreateDevice(KVM_DEV_TYPE_ARM_VGIC_V3, 0, KVM_CREATE_DEVICE_TEST)
            assert fcntl.ioctl(vm, KVM_CREATE_DEVICE, dev) == 0
        finally:
            os.close(vm)
    finally:
        os.close(kvm)
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    assert "VHE mode initialized" in log, [line for line in log.splitlines() if "kvm" in line]


def test_libfdt() -> None:
    import libfdt  # Debian's python3-libfdt in L1's root

    assert libfdt.__file__.startswith("/usr/lib/python3/dist-packages/")
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_u32("#address-cells", 2)
        sw.property_string("compatible", "linux,dummy-virt")
    fdt = sw.as_fdt()
    assert fdt.getprop(0, "compatible").as_str() == "linux,dummy-virt"
    assert fdt.getprop(0, "#address-cells").as_uint32() == 2


def test_python_and_packages() -> None:
    assert sys.executable == "/usr/bin/python3" and sys.version_info[:2] == (3, 11)
    # The .venv's pure-Python packages, and the repository, from PYTHONPATH.
    for name in ("pytest_timeout", "seccompy"):
        assert Path(str(importlib.import_module(name).__file__)).is_relative_to(ROOT / ".venv"), name
    import altovirt.kvm

    assert Path(altovirt.kvm.__file__).is_relative_to(ROOT)
    assert os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] == "1"


def test_guest_assets_at_the_hosts_paths() -> None:
    """The host built the guest's kernel and initramfs into its cache, which L1 sees at the
    same path; debian.kernel() finds the kernel without apt."""
    k = debian.kernel(arch.AARCH64)
    assert str(k.vmlinuz) == os.environ["TESTBED_KERNEL"] and k.release == platform.release()
    assert (k.modules / "modules.dep").is_file()
    check_guest_assets(k.vmlinuz, Path(os.environ["TESTBED_INITRD"]), k.release)


def test_memory_barriers_run_as_arm64_instructions() -> None:
    """The virtqueues' barriers are DMB instructions here, all three (arm64 orders nothing by
    itself), run from the code page the VMM maps (altovirt/devices/virtio/barrier.py)."""
    from altovirt.devices.virtio import barrier
    fences = (barrier.mb, barrier.wmb, barrier.rmb)
    assert barrier._locked not in fences and barrier._nothing not in fences, fences
    for f in fences:
        f()
