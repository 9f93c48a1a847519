"""Every device, as Debian's own drivers use it, in one VM (4 vCPUs, 5 GiB, seccomp on) that
the tests below share in file order: a boot costs about 90 s in the nested test bed. The last
test powers it down through QMP and reads what the guest wrote back on the host.
tests/linux_arm64/test_devices.py runs the same tests on Debian's arm64 kernel."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..testbed import debian, guest
from .conftest import ARCH, GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(900)     # the first test includes the boot
KNOWN = "known content from the host\n"
PLUGGED = "on the hot-plugged disk\n"
HOST_IP2, GUEST_IP2 = "169.254.78.1", "169.254.78.2"
SLOTS = 11                       # 6 disk slots, 2 NIC slots, console, vsock, rng


@dataclass
class Machine:
    g: guest.LinuxGuest
    qmp: Qmp
    ns: Netns
    dir: Path


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("devices")
    for name, text in (("src", KNOWN), ("plug-src", PLUGGED)):
        (d / name).mkdir()
        (d / name / "hello.txt").write_text(text)
    guest.make_ext4(d / "rw.img", "64M", d / "src")
    guest.make_ext4(d / "ro.img", "16M", d / "src")
    guest.make_ext4(d / "plug.img", "32M", d / "plug-src")
    ns = Netns("tap0", "tap1")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    ns.address("tap1", f"{HOST_IP2}/{PREFIX}")
    argv = altovirt_argv(
        kernel, initrd, "-smp", "4", "-m", "5G",
        "-drive", f"id=rw,file={d / 'rw.img'},serial=disk-rw-0",
        "-drive", f"id=ro,file={d / 'ro.img'},readonly=on",
        "-netdev", "id=n0,netdev=tap0,vhost=on", "-chardev", f"id=c0,path={d / 'con.sock'}",
        "-device", f"vsock,id=v0,guest-cid=3,uds-path={d / 'v.sock'}", "-device", "virtio-rng",
        "-xenstore", str(d / "xs.sock"), "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX}")
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    try:
        g.wait_ready(BOOT_TIMEOUT)
        qmp = Qmp(d / "qmp.sock")
        yield Machine(g, qmp, ns, d)
        with contextlib.suppress(Exception):       # the last test may have closed it already
            qmp.close()
    finally:
        g.close()
        ns.close()


def test_vcpus_memory_and_virtio_mmio_devices(vm: Machine) -> None:
    """Linux found every slot where the machine describes it: a PC's DSDT, an Arm board's
    device tree (a node a slot, 512 bytes apart from 0xa000000)."""
    assert vm.g.check("nproc").strip() == "4"
    mem_kib = int(vm.g.check("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert mem_kib > 4.5 * (1 << 20)                      # the RAM above 4 GiB is there
    bound = vm.g.check("ls /sys/bus/platform/drivers/virtio-mmio").split()
    if ARCH.name == "x86_64":
        assert sorted(b for b in bound if b.startswith("LNRO0005:")) == \
            [f"LNRO0005:{i:02x}" for i in range(SLOTS)]
    else:
        assert sorted(b for b in bound if b.endswith(".virtio_mmio")) == \
            sorted(f"{0xA000000 + 0x200 * i:x}.virtio_mmio" for i in range(SLOTS))


def test_disk_read_write_serial(vm: Machine) -> None:
    assert vm.g.check("cat /sys/block/vda/serial").strip() == "disk-rw-0"
    assert vm.g.check("mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/hello.txt") == KNOWN
    vm.g.check("echo written by linux > /mnt/new.txt && sync && umount /mnt")


def test_readonly_disk_refuses_writes(vm: Machine) -> None:
    assert vm.g.check("cat /sys/block/vdb/ro").strip() == "1"
    assert vm.g.check("mkdir -p /ro && mount -o ro /dev/vdb /ro && cat /ro/hello.txt") == KNOWN
    status, out = vm.g.run("mount -o remount,rw /ro")
    assert status != 0, out
    status, out = vm.g.run("dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct")
    assert status != 0 and ("Operation not permitted" in out or "Read-only" in out), out


def ping_and_tcp_both_ways(vm: Machine, host_ip: str, guest_ip: str, port: int) -> None:
    vm.g.check(f"ping -c 3 -W 5 {host_ip}", timeout=60)
    p = vm.ns.run("busybox", "ping", "-c", "3", "-W", "5", guest_ip)
    assert p.returncode == 0, p.stdout + p.stderr
    # guest -> host: 1 MiB of random bytes over TCP, checked by hash on both sides
    listener = vm.ns.receiver(port, 1 << 20)
    try:
        sent = vm.g.check("dd if=/dev/urandom of=/tmp/blob bs=64k count=16 2>/dev/null && "
                          f"md5sum < /tmp/blob && nc {host_ip} {port} < /tmp/blob", timeout=120)
        received, _ = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert received.split() == [str(1 << 20), sent.split()[0]]
    # host -> guest
    blob = os.urandom(1 << 20)
    vm.g.check(f"rm -f /tmp/got; (nc -l -p {port + 1} > /tmp/got &) ; sleep 1")
    p = vm.ns.run("socat", "-u", "STDIN", f"TCP:{guest_ip}:{port + 1},retry=40,interval=0.5", input=blob,
                  timeout=120)
    assert p.returncode == 0, p.stderr
    vm.g.wait_until("[ $(wc -c < /tmp/got) -eq 1048576 ]", "the whole transfer")
    assert vm.g.check("md5sum < /tmp/got").split()[0] == hashlib.md5(blob).hexdigest()


def test_vhost_net_ping_and_tcp_both_ways(vm: Machine) -> None:
    """The configured NIC is served by the kernel (vhost=on): no frame passes through Python."""
    assert "vhost-net serves the queues" in (vm.dir / "vmm.log").read_text()
    ping_and_tcp_both_ways(vm, HOST_IP, GUEST_IP, 5001)


def test_shell_on_hvc0_through_the_console_socket(vm: Machine) -> None:
    got = guest.console_shell(vm.dir / "con.sock", "echo hvc0-says-$((6 * 7)) on $(tty)", b"hvc0-says-42")
    assert b"hvc0-says-42 on /dev/hvc0" in got


def test_vsock_guest_to_host_and_host_to_guest(vm: Machine) -> None:
    # guest -> host port 5100: AltoVirt forwards it to the unix socket <uds-path>_5100
    with guest.vsock_listen(vm.dir / "v.sock", 5100) as srv:
        srv.settimeout(60)
        vm.g.check("(echo ping from the guest | vsock connect 2 5100 > /tmp/vsock-reply &) ; true")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(100) == b"ping from the guest\n"
            conn.sendall(b"pong from the host\n")
    vm.g.wait_until("grep -q 'pong from the host' /tmp/vsock-reply", "the host's reply")
    # host -> guest port 5200: CONNECT through the hybrid socket
    vm.g.check("vsock listen -b -e 5200")
    with guest.vsock_connect(vm.dir / "v.sock", 5200) as c:
        c.settimeout(30)
        c.sendall(b"echo me\n")
        assert c.recv(100) == b"echo me\n"


def test_rng(vm: Machine) -> None:
    assert vm.g.check("cat /sys/class/misc/hw_random/rng_current").strip().startswith("virtio_rng")
    assert vm.g.check("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c").strip() == "32"


def test_xenstore_from_a_linux_program(vm: Machine) -> None:
    env = {**os.environ, "XENSTORED_PATH": str(vm.dir / "xs.sock")}

    def host(*args: str) -> str:
        return subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=30).stdout

    vm.g.check("xs write data/hello 'from linux'")
    assert host("xenstore-read", "/local/domain/1/data/hello") == "from linux\n"
    host("xenstore-write", "/vm/secret", "host only")
    status, out = vm.g.run("xs read /vm/secret")
    assert status == 1 and "EACCES" in out
    host("xenstore-write", "/local/domain/1/config/name", "abc")
    assert vm.g.check("xs read config/name").strip() == "abc"


def test_stop_and_cont_hold_the_guest_clock(vm: Machine) -> None:
    before = float(vm.g.check("cut -d' ' -f1 /proc/uptime"))
    start = time.monotonic()
    vm.qmp.ok("stop")
    assert vm.qmp.ok("query-status")["return"] == {"running": False, "singlestep": False, "status": "paused"}
    time.sleep(5)
    vm.qmp.ok("cont")
    after = float(vm.g.check("cut -d' ' -f1 /proc/uptime"))
    wall = time.monotonic() - start
    assert after - before < wall - 4, (before, after, wall)     # the 5 s paused did not count


def test_disk_hotplug_seen_by_linux(vm: Machine) -> None:
    vm.qmp.ok("blockdev-add", **{"node-name": "plug", "file": {"driver": "file",
                                                              "filename": str(vm.dir / "plug.img")}})
    vm.qmp.ok("device_add", id="plug", driver="virtio-blk-mmio", addr="0x2")
    vm.g.wait_until("[ $(cat /sys/block/vdc/size) -gt 0 ]", "vdc's new capacity")
    assert vm.g.check("mkdir -p /p && mount /dev/vdc /p && cat /p/hello.txt && umount /p") == PLUGGED


def test_nic_hotplug_seen_by_linux(vm: Machine) -> None:
    assert vm.g.check("cat /sys/class/net/eth1/operstate").strip() in ("down", "lowerlayerdown")
    vm.qmp.ok("netdev_add", id="n1", ifname="tap1")
    vm.qmp.ok("device_add", id="n1", driver="virtio-net-mmio", addr="0x1")
    vm.g.check(f"ip addr add {GUEST_IP2}/{PREFIX} dev eth1 && ip link set eth1 up")
    vm.g.wait_until("[ $(cat /sys/class/net/eth1/carrier) = 1 ]", "eth1's link come up")
    ping_and_tcp_both_ways(vm, HOST_IP2, GUEST_IP2, 5011)      # the NIC served by AltoVirt itself


def test_unplugged_vhost_net_nic_lets_go_of_its_vhost(vm: Machine) -> None:
    """device_del of the vhost-net NIC: the guest sees its link go, and the VMM closes the
    /dev/vhost-net instance the NIC had (it kept it before); its tap stays with netdev n0."""
    def vhost_fds() -> int:
        fds = Path(f"/proc/{vm.g.proc.pid}/fd")
        return sum(1 for fd in fds.iterdir() if os.readlink(fd) == "/dev/vhost-net")

    assert vhost_fds() == 1
    vm.qmp.ok("device_del", id="n0")
    assert vm.qmp.event("DEVICE_DELETED")["data"] == {"device": "n0", "path": "n0"}
    vm.g.wait_until("[ $(cat /sys/class/net/eth0/carrier) = 0 ]", "eth0's link go down")
    assert vhost_fds() == 0


def test_system_powerdown_is_a_clean_shutdown(vm: Machine) -> None:
    vm.qmp.ok("system_powerdown")
    vm.qmp.event("POWERDOWN")
    assert vm.qmp.event("SHUTDOWN", BOOT_TIMEOUT)["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert vm.g.wait_exit(60) == 0
    with contextlib.suppress(Exception):
        vm.qmp.close()
    assert guest.read_ext4(vm.dir / "rw.img", "/new.txt") == b"written by linux\n"
