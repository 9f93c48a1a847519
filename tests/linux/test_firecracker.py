"""Debian's kernel driven through altovirt-firecracker's API, with curl as Firecracker's users
do: configured and started, its disk swapped while it runs (Linux's virtio_blk sees the new
image and size), paused, snapshotted and loaded in a new process on another tap and vsock
socket, where the same shell carries on. One boot (about 90 s in the nested test bed)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import FIRECRACKER, GUEST_IP, HOST_IP, PREFIX, Netns, curl, wait_socket

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(900)
HOST_MAC = "02:00:00:a1:70:02"


def vsock_to_host(g: guest.LinuxGuest, uds_path: Path, port: int) -> None:
    """The guest connects to the host's ``port`` through the hybrid vsock at ``uds_path``."""
    with guest.vsock_listen(uds_path, port) as srv:
        srv.settimeout(120)
        g.check(f"(echo hello over vsock | vsock connect 2 {port} > /dev/null &) ; true")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            assert conn.recv(100) == b"hello over vsock\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="SKIPPED LOUDLY: curl (Debian's curl) is missing")
def test_linux_through_the_firecracker_api(kernel: debian.Kernel, initrd: Path, tmp_path: Path) -> None:
    d = tmp_path
    (d / "src").mkdir()
    (d / "src" / "hello.txt").write_text("the first image\n")
    guest.make_ext4(d / "one.img", "64M", d / "src")
    (d / "src" / "hello.txt").write_text("the second image\n")
    guest.make_ext4(d / "two.img", "96M", d / "src")
    ns = Netns("tap0")
    ns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    sock = d / "api.sock"
    g = guest.LinuxGuest([*ns.prefix, *FIRECRACKER, "--api-sock", str(sock), "--id", "debian",
                          "--log-path", str(d / "vmm.log")], log_path=d / "serial.log")
    try:
        wait_socket(g, sock)
        curl(sock, "PUT", "/boot-source", {"kernel_image_path": str(kernel.vmlinuz),
                                           "initrd_path": str(initrd),
                                           "boot_args": f"{guest.APPEND} guest.ip={GUEST_IP}/{PREFIX}"})
        curl(sock, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512})
        curl(sock, "PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(d / "one.img"),
                                           "is_root_device": False, "is_read_only": False})
        curl(sock, "PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                       "guest_mac": "06:00:a9:fe:4d:02"})
        curl(sock, "PUT", "/vsock", {"guest_cid": 3, "uds_path": str(d / "v.sock")})
        curl(sock, "PUT", "/entropy", {})
        curl(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        g.wait_ready(BOOT_TIMEOUT)
        assert g.check("mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/hello.txt") == "the first image\n"
        g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
        assert g.check("cat /sys/class/misc/hw_random/rng_current").startswith("virtio_rng")
        assert g.check("cat /sys/block/vda/size").strip() == str(64 << 11)
        vsock_to_host(g, d / "v.sock", 5200)

        # The disk's image swapped under the running guest: virtio_blk takes the new size from
        # the configuration change, and a new mount reads the new file system.
        g.check("umount /mnt")
        curl(sock, "PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(d / "two.img")})
        deadline = time.monotonic() + 60
        while g.check("cat /sys/block/vda/size").strip() != str(96 << 11):
            assert time.monotonic() < deadline, "Linux never saw the new disk size"
            time.sleep(0.5)
        assert g.check("mount /dev/vda /mnt && cat /mnt/hello.txt && umount /mnt") == "the second image\n"

        # Pause, snapshot, and a new process loads it on another tap: the same shell goes on.
        g.check("cd /tmp && echo kept > /tmp/mark && MARK=still-here")
        curl(sock, "PATCH", "/vm", {"state": "Paused"})
        info = curl(sock, "GET", "/")
        assert isinstance(info, dict) and info["state"] == "Paused" and info["id"] == "debian"
        curl(sock, "PUT", "/snapshot/create", {"snapshot_path": str(d / "vm.state"),
                                               "mem_file_path": str(d / "vm.mem")})
        g.kill()
        ns.close()

        ns = Netns("tap1")
        # The host end keeps its MAC, which the guest has in its ARP cache: one host, another tap.
        ns.run("ip", "link", "set", "tap1", "address", HOST_MAC)
        ns.address("tap1", f"{HOST_IP}/{PREFIX}")
        sock.unlink(missing_ok=True)
        g = guest.LinuxGuest([*ns.prefix, *FIRECRACKER, "--api-sock", str(sock), "--id", "debian2",
                              "--log-path", str(d / "vmm2.log")], log_path=d / "serial2.log")
        wait_socket(g, sock)
        curl(sock, "PUT", "/snapshot/load", {
            "snapshot_path": str(d / "vm.state"), "resume_vm": True,
            "mem_backend": {"backend_type": "File", "backend_path": str(d / "vm.mem")},
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
            "vsock_override": {"uds_path": str(d / "v2.sock")}})
        assert g.check('echo "$MARK $(pwd) $(cat /tmp/mark)"') == "still-here /tmp kept\n"
        assert g.check("mount /dev/vda /mnt && cat /mnt/hello.txt && umount /mnt") == "the second image\n"
        g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
        vsock_to_host(g, d / "v2.sock", 5201)
        config = curl(sock, "GET", "/vm/config")
        assert isinstance(config, dict) and config["network-interfaces"][0]["host_dev_name"] == "tap1"
        assert g.poweroff(120) == 0
    finally:
        g.close()
        ns.close()
