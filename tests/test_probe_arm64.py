"""The probe built for arm64 (guest/probe-arm64.Image) on QEMU's virt machine, emulated (TCG).

AltoVirt's arm64 machine copies QEMU virt's memory map, so the probe proven here
is the one that will prove it: a Linux arm64 Image that learns everything from
the device tree (memory, command line, initrd, CPUs, PSCI, the PL011 and the
virtio-mmio transports), and survives an access nobody decodes. Nothing here
runs AltoVirt: its arm64 machine does not exist yet (issue 25).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ProbeReport
from .net_echo import BIG_FRAME, big_payload
from .unixsock import read_line

QEMU_ARM64 = shutil.which("qemu-system-aarch64")
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
pytestmark = pytest.mark.skipif(
    QEMU_ARM64 is None or CROSS_CC is None,
    reason="SKIPPED LOUDLY: the arm64 probe cannot be proven here: "
           + ("qemu-system-aarch64 (Debian qemu-system-arm) is missing; " if QEMU_ARM64 is None else "")
           + ("aarch64-linux-gnu-gcc (Debian gcc-aarch64-linux-gnu) is missing, so guest/Makefile "
              "skipped probe-arm64.Image" if CROSS_CC is None else ""))

IMAGE_MAGIC = 0x644D5241        # "ARM\x64", Documentation/arch/arm64/booting.rst
TEXT_OFFSET = 0x80000
RAM_BASE = 0x40000000
VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SPI = 0x0A000000, 0x200, 16
GIC_SPI_BASE = 32               # INTID of SPI 0
ETH_P_PROBE = 0x88B5
RESPONDER_MAC = bytes.fromhex("020000000001")
TIMEOUT = 90                    # seconds for one emulated boot on a busy host


@pytest.fixture(scope="module")
def image(probe: Path) -> Path:
    path = probe / "probe-arm64.Image"
    assert path.exists(), "guest/Makefile did not build probe-arm64.Image although the cross compiler is here"
    return path


def qemu_arm64_cmd(image: Path, cmdline: str, *, smp: int = 2, initrd: Path | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """QEMU virt with a GICv3, emulated: the arm64 machine contract's reference."""
    assert QEMU_ARM64 is not None
    cmd = [QEMU_ARM64, "-M", "virt,gic-version=3", "-accel", "tcg", "-cpu", "max", "-smp", str(smp),
           "-m", "256M", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
           "-global", "virtio-mmio.force-legacy=false", "-kernel", str(image), "-append", cmdline]
    if initrd:
        cmd += ["-initrd", str(initrd)]
    return cmd + list(extra)


class EchoResponder:
    """tests/net_echo.py's responder on a unix datagram socket, QEMU's "-netdev dgram" peer:
    each datagram is one Ethernet frame, without a virtio-net header."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.frames = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                frame, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(frame) < 14 or frame[12:14] != struct.pack(">H", ETH_P_PROBE):
                continue
            self.frames += 1
            head = frame[6:12] + RESPONDER_MAC + frame[12:14]
            reply = head + big_payload(BIG_FRAME - len(head)) if frame[14:17] == b"big" else \
                (head + b"echo " + frame[14:])[:1514]
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory for unix sockets, whose paths must stay under 108 bytes."""
    path = Path(f"/tmp/probe-arm64-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_interactive(cmd: list[str], console: Path | None, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Run QEMU, answering the probe's "echo ready" on the serial line and "console ready"
    on the virtio console's socket; returns the exit status, stdout and stderr."""
    q = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert q.stdin is not None and q.stdout is not None and q.stderr is not None
    out: list[str] = []
    timer = threading.Timer(timeout, q.kill)
    timer.start()
    try:
        for raw in q.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            out.append(line)
            if line.startswith("probe: echo ready"):
                q.stdin.write(b"hello from the host\n")
                q.stdin.flush()
            elif line.startswith("probe: console ready") and console is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(30)
                    s.connect(str(console))
                    s.sendall(b"ping from the host\n")
                    out.append("host: console answer " + read_line(s).decode(errors="replace").rstrip("\n"))
        q.wait(10)
    finally:
        timer.cancel()
        if q.poll() is None:
            q.kill()
            q.wait()
    return q.returncode, "\n".join(out), q.stderr.read().decode(errors="replace")


def test_image_header(image: Path) -> None:
    """booting.rst's 64-byte header: a branch, text_offset 0x80000, the whole footprint
    (with .bss and stacks) as image_size, little-endian with 4 KiB pages, the magic."""
    data = image.read_bytes()
    code0, _code1, text_offset, image_size, flags, r2, r3, r4, magic, _r5 = struct.unpack_from(
        "<IIQQQQQQII", data)
    assert code0 >> 26 == 0b000101                      # B <entry>
    assert text_offset == TEXT_OFFSET and magic == IMAGE_MAGIC
    assert len(data) <= image_size <= 16 << 20
    assert flags == 0b010 and r2 == r3 == r4 == 0       # LE, 4K, base as low as possible
    elf = image.with_suffix(".elf").read_bytes()
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == 183        # EM_AARCH64
    assert struct.unpack_from("<Q", elf, 24)[0] == RAM_BASE + TEXT_OFFSET               # e_entry


def blk_words(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)


def test_probe_on_qemu_virt(image: Path, tmp_path: Path, short_tmp: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(200_000))
    disk = tmp_path / "disk.img"
    disk_data = os.urandom(1 << 20)
    disk.write_bytes(disk_data)
    console, net_peer, net_local = (short_tmp / n for n in ("console.sock", "net-host.sock", "net-qemu.sock"))
    responder = EchoResponder(net_peer)
    tests = "info,smp,rng,blk,net,net-big,console,echo"
    cmdline = f"console=ttyAMA0 probe.run={tests} marker=arm64"
    cmd = qemu_arm64_cmd(image, cmdline, initrd=initrd, extra=(
        "-drive", f"file={disk},if=none,id=d0,format=raw,discard=unmap",
        "-device", "virtio-blk-device,drive=d0,serial=disk0",
        "-device", "virtio-rng-device",
        "-netdev", f"dgram,id=n0,local.type=unix,local.path={net_local},"
                   f"remote.type=unix,remote.path={net_peer}",
        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
        "-chardev", f"socket,id=c0,path={console},server=on,wait=off",
        "-device", "virtio-serial-device,max_ports=1", "-device", "virtconsole,chardev=c0,nr=0"))
    try:
        code, out, err = run_interactive(cmd, console)
    finally:
        responder.close()
    r = ProbeReport.parse(out)
    assert r.done == "ok", out + err
    assert code == 0, err                           # PSCI SYSTEM_OFF: QEMU exits 0
    assert r.tests == dict.fromkeys(tests.split(","), "ok")

    # boot: where QEMU put the Image, what the device tree says
    assert r.line("boot=") == f"boot=image load={RAM_BASE + TEXT_OFFSET:#x}"
    assert r.values["cmdline"] == cmdline
    assert r.line("memory ") == f"memory {RAM_BASE:#x} {256 << 20:#x}"
    assert int(r.values["ram"]) == 256 << 20
    cpus = r.line("cpus ")
    assert cpus.startswith("cpus count=2 bsp=0x0 psci=hvc psci-version=1.")
    assert r.line("uart") == "uart pl011 0x9000000"
    words = dict(w.split("=") for w in r.line("initrd").split()[1:])
    data = initrd.read_bytes()
    assert int(words["size"]) == len(data) and int(words["crc32"], 16) == zlib.crc32(data)
    assert RAM_BASE <= int(words["addr"], 16) < RAM_BASE + (256 << 20)
    dtb = r.line("dtb ").split()
    assert int(dtb[1], 16) % 8 == 0 and dtb[3] == "version=17" and dtb[4] == "el=1"

    # devices: on the contract's transports and interrupts, found in the device tree
    found = {}
    for ln in r.lines:
        if ln.startswith("probe: virtio-mmio "):
            _, _, base, irq, dev_id = ln.split()
            i = (int(base, 16) - VIRTIO_MMIO_BASE) // VIRTIO_MMIO_SIZE
            assert int(base, 16) == VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE and 0 <= i < 32
            assert irq == f"irq={GIC_SPI_BASE + VIRTIO_MMIO_SPI + i}"
            found[int(dev_id.split("=")[1])] = i
    assert sorted(found) == [1, 2, 3, 4]            # net, block, console, entropy

    # an access nobody decodes: QEMU aborts, the probe skips it; reads come back all ones
    aborts = [ln for ln in r.lines if ln.startswith("probe: abort ")]
    assert [a.split()[2:4] for a in aborts] == [
        ["write", "addr=0x90c0000"],                 # boot timer 1 (an MMIO device on AltoVirt)
        ["write", "addr=0xb000000"], ["read", "addr=0xb000000"],    # mmio-gap
        ["write", "addr=0x90c0000"]]                 # boot timer 2
    assert all(a.endswith(" dfsc=0x10 skipped") for a in aborts)    # synchronous external abort
    assert r.line("mmio-gap") == "mmio-gap read=0xffffffff"
    assert r.line("boottimer") == "boottimer 1 2"

    # smp: PSCI CPU_ON brought up the secondary
    assert r.line("smp ") == "smp cpus=2 expected=2 bsp=0x0"
    assert r.line("ap ") == "ap 1 mpidr=0x1 up"

    # rng, blk: as on x86
    rng = r.line("rng irq=")
    assert rng.startswith(f"rng irq={GIC_SPI_BASE + VIRTIO_MMIO_SPI + found[4]} bytes=4096 nonzero=")
    assert rng.endswith(" isr=0x1 after-ack=0x0")
    blk = blk_words(r.line("blk0 "))
    crc = zlib.crc32(disk_data[:4096])
    assert blk == {"capacity": "2048", "blk_size": "512", "seg_max": blk["seg_max"], "ro": "0",
                   "serial": "disk0", "id": "ok", "read": "ok", "read-crc32": f"{crc:#x}",
                   "write": "ok", "flush": "ok", "readback": "ok", "zeroes": "ok", "discard": "ok",
                   "oob": "ioerr", "unknown": "unsupp", "isr": "0x1"}
    written = disk.read_bytes()
    assert written[4096:8192] == bytes((j * 7 + 3) & 0xFF for j in range(4096))
    assert written[8192:12288] == bytes(4096)       # WRITE_ZEROES of sectors 16-23

    # net: every frame echoed through the dgram socket; a 4000-byte frame over merged buffers
    assert r.line("net mac=") == "net mac=52:54:00:12:34:56 link=1 tx=32 rx=32"
    assert r.line("net-big") == "net-big bytes=4000 num_buffers=2 match=1"
    assert responder.frames == 33

    # console and echo: both directions
    assert r.line("console unconnected-tx") == "console unconnected-tx=65536"
    assert r.line("console rx=") == "console rx=ping from the host"
    assert "host: console answer pong ping from the host" in out
    assert r.line("echo hello") == "echo hello from the host"


def test_x86_only_tests_are_not_there(image: Path) -> None:
    """The i8042, ACPI and triple-fault tests are x86's: asked for on arm64, they are unknown
    and fail the run; the probe still powers off through PSCI."""
    cmd = qemu_arm64_cmd(image, "probe.run=info,acpi,triplefault", smp=1)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    r = ProbeReport.parse(p.stdout)
    assert p.returncode == 0, p.stderr
    assert r.tests == {"info": "ok", "acpi": "unknown", "triplefault": "unknown"}
    assert r.line("cpus ").startswith("cpus count=1 ") and r.line("initrd") == "initrd none"
    assert r.done == "fail"
