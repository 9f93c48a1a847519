"""Every device on PCI (-machine q35): Debian's kernel finds the host bridge in the DSDT
and MCFG, enumerates bus 0 by itself, binds virtio-pci to each function and gives each
queue its own MSI-X vector, as Debian's own lspci -vv shows. Two VMs (2 vCPUs each), one
after the other, share the tests in file order: the first has the devices AltoVirt serves
itself, is saved to a snapshot, restored in a new process, migrated live to a third, and
powered down there to read back on the host what the guest wrote (on the way, a disk and
a NIC are hot-plugged into its root ports and out again, and a disk once more into the
migrated VM's, whose ports the migration carried); the second has
those the host kernel or another process serves (vhost-net, vhost-vsock, virtio-fs) and the
balloon, their interrupts raised by the kernel straight into the MSI-X vectors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..testbed import debian, guest, initramfs
from .conftest import GUEST_IP, HOST_IP, PREFIX, Netns, Qmp, altovirt_argv, migration_ends, wait_for_qmp
from .test_devices import Machine, ping_and_tcp_both_ways

BOOT_TIMEOUT = 400
pytestmark = pytest.mark.timeout(900)     # the first test includes the boot
KNOWN = "known content from the host\n"
# What sits where on bus 0: (slot.function, PCI device ID, MSI-X vectors: queues + config).
FUNCTIONS = {
    "00:00.0": (0x0008, 0),        # the host bridge
    "00:06.0": (0x000C, 0),        # pcie-root-port rp1, slot 1 (pcieport)
    "00:07.0": (0x000C, 0),        # pcie-root-port rp2, slot 2
    "00:03.0": (0x1042, 2),        # virtio-blk-pci, addr=0x3
    "00:04.0": (0x1041, 3),        # virtio-net-pci, addr=0x4
    "00:05.0": (0x1043, 3),        # virtio-serial-pci (the console), addr=0x5
    "00:05.1": (0x1044, 2),        # virtio-rng-pci, addr=0x5.0x1
    "00:01.0": (0x1053, 4),        # vsock, in the first free slot
}


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
CID = 1000 + os.getpid() % 50000          # unique on this host while the test runs
ARGV: dict[Path, list[str]] = {}          # each VM's command line, by its directory
HOST_MAC = "02:00:00:a1:70:02"


def lspci_files() -> dict[str, Path]:
    """Debian's lspci and what it links, for the guest: the program and libpci from their
    packages, the other libraries from this machine's (the same Debian release)."""
    lspci = debian.unpack("pciutils") / "usr/bin/lspci"
    libpci = debian.unpack("libpci3") / "usr/lib/x86_64-linux-gnu"
    out = subprocess.run(["ldd", str(lspci)], env={"LD_LIBRARY_PATH": str(libpci)}, capture_output=True,
                         text=True, check=True).stdout
    assert "not found" not in out, out
    files = {"usr/bin/lspci": lspci}
    for name, path in re.findall(r"^\s*(\S+) => (/\S+)", out, re.M):
        files[f"lib/x86_64-linux-gnu/{name}"] = Path(path).resolve()
    loader = re.search(r"^\s*(/lib64/ld-linux\S+)", out, re.M)
    assert loader is not None, out
    files[loader[1].lstrip("/")] = Path(loader[1]).resolve()
    return files


@pytest.fixture(scope="module")
def initrd(kernel: debian.Kernel) -> Path:
    return initramfs.build(kernel, modules=(*initramfs.DEFAULT_MODULES, "virtio_balloon", "virtiofs"),
                           extra=lspci_files())


def host_side() -> Netns:
    """A namespace with tap0 at the host's address, and the same MAC in every one: they stand
    for one host, which a guest that moves has in its ARP cache."""
    ns = Netns("tap0")
    ns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    return ns


def msix_enabled(g: guest.LinuxGuest, function: str) -> str:
    """lspci -vv's MSI-X line for ``function``."""
    out = g.check(f"lspci -vv -s {function}")
    line = next((ln.strip() for ln in out.splitlines() if "MSI-X:" in ln), "")
    assert line.startswith("Capabilities:") and "Enable+" in line, out
    return line


@pytest.fixture(scope="module")
def vm(kernel: debian.Kernel, initrd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("pci")
    (d / "src").mkdir()
    (d / "src" / "hello.txt").write_text(KNOWN)
    guest.make_ext4(d / "rw.img", "64M", d / "src")
    ns = host_side()
    argv = altovirt_argv(
        kernel, initrd, "-machine", "q35", "-smp", "2", "-m", "1G",
        "-drive", f"id=d0,file={d / 'rw.img'},if=none",
        "-device", "virtio-blk-pci,drive=d0,id=rw,serial=disk-rw-0,bus=pcie.0,addr=0x3",
        "-netdev", "tap,id=n0,ifname=tap0", "-device", "virtio-net-pci,netdev=n0,id=net0,bus=pcie.0,addr=0x4",
        "-chardev", f"socket,id=c0,path={d / 'con.sock'},server,nowait",
        "-device", "virtio-serial-pci,id=ser0,bus=pcie.0,addr=0x5,multifunction=on",
        "-device", "virtconsole,chardev=c0,id=con0,nr=0",
        "-object", "rng-random,id=r0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=r0,id=rng0,addr=5.1",
        "-device", f"vsock,id=v0,guest-cid=3,uds-path={d / 'v.sock'}",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,addr=0x6,slot=1,chassis=1",
        "-device", "pcie-root-port,id=rp2,bus=pcie.0,addr=0x7,slot=2,chassis=1,port=2",
        "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX}")
    ARGV[d] = argv
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    m = None
    try:
        g.wait_ready(BOOT_TIMEOUT)
        m = Machine(g, Qmp(d / "qmp.sock"), ns, d)
        yield m
        with contextlib.suppress(Exception):       # the last test may have closed it already
            m.qmp.close()
    finally:
        (m.g if m else g).close()                  # the VM's last process and namespace
        (m.ns if m else ns).close()


def test_linux_enumerates_bus_0_and_enables_msix(vm: Machine) -> None:
    """Each function is where the command line put it, driven by virtio-pci, with MSI-X on:
    one vector a queue and one for configuration changes, and no INTx."""
    # Only the lines looked at: the serial console, an exit a byte, is slow in the bed.
    dmesg = vm.g.check("dmesg | grep -E 'MMCONFIG|host bridge to bus'")
    assert "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff]" in dmesg, dmesg
    assert "PCI host bridge to bus 0000:00" in dmesg, dmesg
    found = vm.g.check("ls /sys/bus/pci/devices").split()
    assert sorted(found) == sorted(f"0000:{f}" for f in FUNCTIONS), dmesg
    for function, (device_id, vectors) in FUNCTIONS.items():
        sysfs = f"/sys/bus/pci/devices/0000:{function}"
        assert int(vm.g.check(f"cat {sysfs}/device"), 16) == device_id
        if not vectors:
            continue
        assert vm.g.check(f"basename $(readlink {sysfs}/driver)").strip() == "virtio-pci"
        assert len(vm.g.check(f"ls {sysfs}/msi_irqs").split()) == vectors, function
        assert vm.g.check(f"cat {sysfs}/irq").strip() == "0" or vectors      # no INTx pin
    for port in ("00:06.0", "00:07.0"):
        sysfs = f"/sys/bus/pci/devices/0000:{port}"
        assert vm.g.check(f"basename $(readlink {sysfs}/driver)").strip() == "pcieport"
        assert len(vm.g.check(f"ls {sysfs}/msi_irqs").split()) == 1, port
    interrupts = vm.g.check("cat /proc/interrupts")
    assert "PCI-MSI" in interrupts and "virtio0-config" in interrupts, interrupts
    assert "MSI-X: Enable+ Count=3 Masked-" in msix_enabled(vm.g, "00:04.0")     # Debian's lspci
    assert "Kernel driver in use: virtio-pci" in vm.g.check("lspci -vv -s 00:03.0")


def test_disk_read_write_serial(vm: Machine) -> None:
    assert vm.g.check("cat /sys/block/vda/serial").strip() == "disk-rw-0"
    assert vm.g.check("mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/hello.txt") == KNOWN
    digest = vm.g.check("dd if=/dev/urandom of=/mnt/blob bs=64k count=64 2>/dev/null && sync && "
                        "md5sum < /mnt/blob && umount /mnt", timeout=120).split()[0]
    (vm.dir / "blob.md5").write_text(digest)


def test_net_ping_and_tcp_both_ways(vm: Machine) -> None:
    ping_and_tcp_both_ways(vm, HOST_IP, GUEST_IP, 5001)


def test_console_shell(vm: Machine) -> None:
    got = guest.console_shell(vm.dir / "con.sock", "echo hvc0-says-$((6 * 7)) on $(tty)", b"hvc0-says-42")
    assert b"hvc0-says-42 on /dev/hvc0" in got


def test_vsock_guest_to_host(vm: Machine) -> None:
    with guest.vsock_listen(vm.dir / "v.sock", 5100) as srv:
        srv.settimeout(60)
        vm.g.check("(echo ping from the guest | vsock connect 2 5100 > /tmp/vsock-reply &) ; true")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(100) == b"ping from the guest\n"
            conn.sendall(b"pong from the host\n")
    vm.g.wait_until("grep -q 'pong from the host' /tmp/vsock-reply", "the host's reply")


def test_rng(vm: Machine) -> None:
    assert vm.g.check("cat /sys/class/misc/hw_random/rng_current").strip().startswith("virtio_rng")
    assert vm.g.check("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c").strip() == "32"


HOT_MAC, HOT_GUEST_IP, HOT_HOST_IP = "02:00:00:a1:70:10", "10.0.3.2", "10.0.3.1"


def hot_disk(vm: Machine, name: str) -> str:
    """A raw image of random bytes, blockdev-added as node ``name``; its MD5."""
    data = os.urandom(4 << 20)
    (vm.dir / f"{name}.img").write_bytes(data)
    vm.qmp.ok("blockdev-add", **{"node-name": name, "driver": "raw",
                                 "file": {"driver": "file", "filename": str(vm.dir / f"{name}.img")}})
    return hashlib.md5(data).hexdigest()


def in_slot(vm: Machine, bus: int, device: str) -> str:
    """The guest's name of the block or net device pciehp found behind bus ``bus``."""
    path = f"/sys/bus/pci/devices/0000:{bus:02x}:00.0/virtio*/{device}"
    vm.g.wait_until(f"ls {path} >/dev/null 2>&1", f"the hot-plugged {device} device on bus {bus}")
    return vm.g.check(f"ls {path}").strip()


def test_hot_plug_and_unplug_into_root_ports(vm: Machine) -> None:
    """Linux's pciehp takes both slots; a disk and a NIC device_add put into them are found,
    bound to virtio-pci with MSI-X and used (data by hash, a ping over the new NIC); device_del
    presses each slot's button, the guest lets go, turns the slot off, and DEVICE_DELETED
    follows; what the guest wrote is in the image."""
    dmesg = vm.g.check("dmesg | grep pciehp")
    for slot in (1, 2):
        found = rf"pcieport 0000:00:0{5 + slot}\.0: pciehp: Slot #{slot} AttnBtn\+ PwrCtrl\+.*HotPlug\+"
        assert re.search(found, dmesg), dmesg
    digest = hot_disk(vm, "hot1")
    vm.qmp.ok("device_add", driver="virtio-blk-pci", id="hot1", bus="rp1", serial="hot-disk-1")
    vm.ns.run("ip", "tuntap", "add", "dev", "tap1", "mode", "tap")
    vm.ns.address("tap1", f"{HOT_HOST_IP}/24")
    vm.qmp.ok("netdev_add", type="tap", id="hotnet", ifname="tap1")
    vm.qmp.ok("device_add", driver="virtio-net-pci", id="hotnet", bus="rp2", mac=HOT_MAC)
    disk = in_slot(vm, 1, "block")
    assert vm.g.check(f"cat /sys/block/{disk}/serial").strip() == "hot-disk-1"
    assert vm.g.check(f"md5sum < /dev/{disk}", timeout=120).split()[0] == digest
    vm.g.check(f"echo written-while-hot-plugged | dd of=/dev/{disk} bs=512 seek=100 conv=fsync 2>/dev/null")
    nic = in_slot(vm, 2, "net")
    assert vm.g.check(f"cat /sys/class/net/{nic}/address").strip() == HOT_MAC
    vm.g.check(f"ip addr add {HOT_GUEST_IP}/24 dev {nic} && ip link set {nic} up")
    vm.g.check(f"ping -c 2 -W 5 {HOT_HOST_IP}", timeout=120)
    assert "MSI-X: Enable+ Count=2 Masked-" in msix_enabled(vm.g, "01:00.0")
    vm.qmp.ok("device_del", id="hot1")
    vm.qmp.ok("device_del", id="hotnet")
    # Linux waits 5 s for a second press of each button, then powers each slot off.
    deleted = [vm.qmp.event("DEVICE_DELETED", 60)["data"] for _ in range(2)]
    assert sorted(d["device"] for d in deleted) == ["hot1", "hotnet"]       # type: ignore[index]
    vm.g.wait_until(f"! test -e /sys/class/net/{nic} && ! test -e /dev/{disk}", "both devices gone")
    assert "01:00.0" not in vm.g.check("lspci") and "02:00.0" not in vm.g.check("lspci")
    vm.qmp.ok("blockdev-del", **{"node-name": "hot1"})
    vm.qmp.ok("netdev_del", id="hotnet")
    with open(vm.dir / "hot1.img", "rb") as image:
        image.seek(100 * 512)
        assert image.read(25) == b"written-while-hot-plugged"
    vm.g.check(f"ping -c 1 -W 5 {HOST_IP}", timeout=60)        # the rest goes on


def restart(vm: Machine, name: str, incoming: str, ns: Netns | None = None) -> None:
    """The VM's next process (``name``), taking the guest in with ``-incoming``, in ``ns`` (a
    new network namespace) or the VM's own; ``vm`` then stands for it."""
    d, ns = vm.dir, ns or vm.ns
    # Its own sockets: the process it takes over from may still hold the old ones.
    argv = [re.sub(r"/(qmp|con|v)\.sock\b", rf"/{name}.\1.sock", a) for a in ARGV[d]]
    g = guest.LinuxGuest([*ns.prefix, *argv, "-incoming", incoming], log_path=d / f"{name}.serial.log")
    try:
        qmp = wait_for_qmp(g, d / f"{name}.qmp.sock")
    except BaseException:
        g.close()
        raise
    vm.g, vm.qmp = g, qmp
    if ns is not vm.ns:
        vm.ns.close()
        vm.ns = ns


def wait_paused(qmp: Qmp) -> None:
    deadline = time.monotonic() + 300
    while qmp.ok("query-status")["return"] != {"running": False, "singlestep": False, "status": "paused"}:
        assert time.monotonic() < deadline, "the incoming VM never got paused"
        time.sleep(0.2)


def restore_in_a_new_process(vm: Machine) -> None:
    """Stop ``vm``, snapshot it to a file, quit, and restore it in a new process, running."""
    vm.qmp.ok("stop")
    vm.qmp.ok("migrate", uri=f"file:{vm.dir / 'snap'}")
    assert migration_ends(vm.qmp)["status"] == "completed"
    vm.qmp.ok("quit")
    assert vm.g.wait_exit(120) == 0
    with contextlib.suppress(Exception):    # qemu.qmp may see the VMM's close first
        vm.qmp.close()
    vm.g.close()
    restart(vm, "restored", f"file:{vm.dir / 'snap'}")
    wait_paused(vm.qmp)
    vm.qmp.ok("cont")


def migrate_live_to_a_new_process(vm: Machine) -> None:
    """Migrate the running ``vm`` live to a new process in a new namespace, which runs it; the
    source quits."""
    source, old = vm.qmp, vm.g
    restart(vm, "migrated", f"unix:{vm.dir / 'mig.sock'}", host_side())
    source.ok("migrate", uri=f"unix:{vm.dir / 'mig.sock'}")
    assert migration_ends(source)["status"] == "completed"
    source.ok("quit")
    assert old.wait_exit(120) == 0
    with contextlib.suppress(Exception):
        source.close()
    old.close()
    wait_paused(vm.qmp)
    vm.qmp.ok("cont")


def test_snapshot_restore_and_live_migration(vm: Machine) -> None:
    """The functions' configuration space, BARs, MSI-X vectors and queues survive a snapshot
    and its restore in a new process, then a live migration to a third: the guest goes on
    with its disk, NIC and vectors as they were."""
    vm.g.check("mount /dev/vda /mnt && echo before the snapshot > /mnt/snap.txt && sync")
    restore_in_a_new_process(vm)
    assert vm.g.check("cat /mnt/snap.txt") == "before the snapshot\n"
    vm.g.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=120)
    assert "MSI-X: Enable+ Count=3 Masked-" in msix_enabled(vm.g, "00:04.0")
    migrate_live_to_a_new_process(vm)
    vm.g.check("echo after the migration >> /mnt/snap.txt && sync && umount /mnt")
    ping_and_tcp_both_ways(vm, HOST_IP, GUEST_IP, 5031)


def test_hot_plug_into_the_migrated_vms_root_port(vm: Machine) -> None:
    """The ports' state (bus numbers, MSI, slot control) came with the migration: pciehp on
    the destination still hears its slots."""
    digest = hot_disk(vm, "hot2")
    vm.qmp.ok("device_add", driver="virtio-blk-pci", id="hot2", bus="rp2")
    disk = in_slot(vm, 2, "block")
    assert vm.g.check(f"md5sum < /dev/{disk}", timeout=120).split()[0] == digest


def test_powerdown_and_the_data_on_the_host(vm: Machine) -> None:
    vm.qmp.ok("system_powerdown")
    assert vm.qmp.event("SHUTDOWN", BOOT_TIMEOUT)["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert vm.g.wait_exit(60) == 0
    blob = guest.read_ext4(vm.dir / "rw.img", "/blob")
    assert hashlib.md5(blob).hexdigest() == (vm.dir / "blob.md5").read_text()
    assert guest.read_ext4(vm.dir / "rw.img", "/snap.txt") == b"before the snapshot\nafter the migration\n"


# --- the second VM: what the host kernel and other processes serve, and the balloon ---

@pytest.fixture(scope="module")
def offload(kernel: debian.Kernel, initrd: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    d = tmp_path_factory.mktemp("pci-offload")
    (d / "shared").mkdir()
    (d / "shared" / "from-host.txt").write_text("written on the host\n")
    sock = d / "fs.sock"
    virtiofsd = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={d / 'shared'}",
                                  "-o", "cache=none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert virtiofsd.poll() is None and time.monotonic() < deadline, "virtiofsd did not start"
        time.sleep(0.05)
    ns = Netns("tap0")
    ns.address("tap0", f"{HOST_IP}/{PREFIX}")
    argv = altovirt_argv(
        kernel, initrd, "-machine", "q35,mem-share=on", "-smp", "2", "-m", "1G",
        "-netdev", "tap,id=n0,ifname=tap0,vhost=on", "-device", "virtio-net-pci,netdev=n0,id=net0",
        "-device", f"vhost-vsock-pci,id=vv,guest-cid={CID}",
        "-chardev", f"socket,id=fs,path={sock}", "-device", "vhost-user-fs-pci,chardev=fs,tag=shared,id=fs0",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-api-channel", f"unix:{d / 'qmp.sock'}", "-D", str(d / "vmm.log"),
        append=f"guest.ip={GUEST_IP}/{PREFIX}")
    g = guest.LinuxGuest([*ns.prefix, *argv], log_path=d / "serial.log")
    try:
        g.wait_ready(BOOT_TIMEOUT)
        qmp = Qmp(d / "qmp.sock")
        yield Machine(g, qmp, ns, d)
        with contextlib.suppress(Exception):
            qmp.close()
    finally:
        g.close()
        ns.close()
        virtiofsd.kill()
        virtiofsd.wait()


def test_offloaded_devices_have_their_vectors(offload: Machine) -> None:
    drivers = offload.g.check("for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done")
    assert sorted(drivers.split()) == sorted(["virtio_net", "vmw_vsock_virtio_transport", "virtiofs",
                                              "virtio_balloon"])
    for function in offload.g.check("ls /sys/bus/pci/devices").split()[1:]:
        msix_enabled(offload.g, function.removeprefix("0000:"))
    assert "vhost-net serves the queues" in (offload.dir / "vmm.log").read_text()


def test_vhost_net_ping_and_tcp_both_ways(offload: Machine) -> None:
    ping_and_tcp_both_ways(offload, HOST_IP, GUEST_IP, 5021)


def test_vhost_vsock_both_ways(offload: Machine) -> None:
    offload.g.check("vsock listen -b -e 5400")
    deadline = time.monotonic() + 30
    while True:                             # the listener may still be starting
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect((CID, 5400))
            break
        except (ConnectionResetError, ConnectionRefusedError):
            s.close()
            assert time.monotonic() < deadline, "the guest's listener never answered"
            time.sleep(0.2)
    with s:
        s.sendall(b"over vhost-vsock on PCI\n")
        assert s.recv(100) == b"over vhost-vsock on PCI\n"
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as srv:
        srv.bind((socket.VMADDR_CID_ANY, 5401))
        srv.listen(1)
        srv.settimeout(60)
        offload.g.check("(echo ping from the guest | vsock connect 2 5401 > /tmp/vv-reply &) ; true")
        conn, (peer, _) = srv.accept()
        with conn:
            conn.settimeout(30)
            assert peer == CID and conn.recv(100) == b"ping from the guest\n"
            conn.sendall(b"pong\n")
    offload.g.wait_until("grep -q pong /tmp/vv-reply", "the host's reply")


def test_virtiofs_data_both_ways(offload: Machine) -> None:
    offload.g.check("mkdir -p /shared && mount -t virtiofs shared /shared")
    assert offload.g.check("cat /shared/from-host.txt") == "written on the host\n"
    digest = offload.g.check("dd if=/dev/urandom of=/shared/blob bs=64k count=32 2>/dev/null && "
                             "md5sum /shared/blob").split()[0]
    assert hashlib.md5((offload.dir / "shared" / "blob").read_bytes()).hexdigest() == digest


def test_balloon_takes_memory_from_the_guest(offload: Machine) -> None:
    total = int(offload.g.check("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    offload.qmp.ok("balloon", value=(1 << 30) - (200 << 20))
    offload.qmp.event("BALLOON_CHANGE", 120)          # the first pages went
    deadline = time.monotonic() + 120
    while offload.qmp.ok("query-balloon")["return"] != {"actual": (1 << 30) - (200 << 20)}:
        assert time.monotonic() < deadline, "the balloon never reached 200 MiB"
        time.sleep(0.5)
    assert int(offload.g.check("awk '/MemTotal/ {print $2}' /proc/meminfo")) <= total - 200 * 1024
