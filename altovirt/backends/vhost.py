"""The host kernel's vhost (<linux/vhost.h>): a device's virtqueues served in the kernel.

vhost reads the guest's rings and buffers through this process's mapping of
guest RAM (the memory table), takes the queue notifications straight from
the ioeventfds KVM signals (``kick``), does the device's work (vhost-net sends
and receives on a tap; vhost-vsock carries the host's AF_VSOCK sockets) and
raises the guest's interrupt through the irqfd (``call``): no frame and no
notification passes through Python.

Request numbers are literals, checked against the kernel's headers in
``tests/test_vhost.py``, as the tap's are.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from . import BackendError

VHOST_GET_FEATURES = 0x8008AF00
VHOST_SET_FEATURES = 0x4008AF00
VHOST_SET_OWNER = 0x0000AF01
VHOST_SET_MEM_TABLE = 0x4008AF03
VHOST_SET_VRING_NUM = 0x4008AF10
VHOST_SET_VRING_ADDR = 0x4028AF11
VHOST_SET_VRING_BASE = 0x4008AF12
VHOST_GET_VRING_BASE = 0xC008AF12
VHOST_SET_VRING_KICK = 0x4008AF20
VHOST_SET_VRING_CALL = 0x4008AF21
VHOST_NET_SET_BACKEND = 0x4008AF30
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
VHOST_VSOCK_SET_RUNNING = 0x4004AF61
# Every request above, for the seccomp allow-lists.
VHOST_IOCTLS = (VHOST_GET_FEATURES, VHOST_SET_FEATURES, VHOST_SET_OWNER, VHOST_SET_MEM_TABLE,
                VHOST_SET_VRING_NUM, VHOST_SET_VRING_ADDR, VHOST_SET_VRING_BASE, VHOST_GET_VRING_BASE,
                VHOST_SET_VRING_KICK, VHOST_SET_VRING_CALL, VHOST_NET_SET_BACKEND,
                VHOST_VSOCK_SET_GUEST_CID, VHOST_VSOCK_SET_RUNNING)

_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")              # struct vhost_vring_state: index, num
_VRING_FILE = struct.Struct("<Ii")               # struct vhost_vring_file: index, fd
_VRING_ADDR = struct.Struct("<IIQQQQ")           # struct vhost_vring_addr
_MEMORY = struct.Struct("<II")                   # struct vhost_memory: nregions, padding
_MEMORY_REGION = struct.Struct("<QQQQ")          # gpa, size, userspace address, flags/padding

DEVICE = "/dev/vhost-net"
VSOCK_DEVICE = "/dev/vhost-vsock"
_MODULES = {DEVICE: "vhost_net", VSOCK_DEVICE: "vhost_vsock"}


class Vhost:
    """One vhost instance (vhost-net by default), owned by this process (VHOST_SET_OWNER)."""

    def __init__(self, path: str = DEVICE, fd: int | None = None) -> None:
        """Open ``path``, or take ``fd``, the device someone else opened and passed (QEMU's
        and StratoVirt's ``vhostfd=``): it is ours from now on."""
        if fd is not None:
            self.fd, path = fd, f"vhostfd={fd}"
        else:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                module = _MODULES.get(path)
                hint = f" (load the {module} module)" if module and e.errno == errno.ENOENT else ""
                raise BackendError(e.errno, f"{path}: {e.strerror}{hint}") from e
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER, 0)
            self.features = _U64.unpack(fcntl.ioctl(self.fd, VHOST_GET_FEATURES, bytes(8)))[0]
        except OSError as e:
            os.close(self.fd)
            raise BackendError(e.errno, f"{path}: {e.strerror}") from e

    def set_features(self, features: int) -> None:
        fcntl.ioctl(self.fd, VHOST_SET_FEATURES, _U64.pack(features))

    def set_mem_table(self, regions: list[tuple[int, int, int, int]], fd: int | None = None) -> None:
        """Guest RAM as (guest physical address, size, userspace address, offset) regions. The
        kernel reads it through this process's mapping: the offsets, and the memfd ``fd`` a
        vhost-user back end maps, are not its business."""
        table = _MEMORY.pack(len(regions), 0) + b"".join(
            _MEMORY_REGION.pack(gpa, size, hva, 0) for gpa, size, hva, _ in regions)
        fcntl.ioctl(self.fd, VHOST_SET_MEM_TABLE, table)

    def start_vring(self, index: int, size: int, next_avail: int, rings: tuple[int, int, int],
                    kick: int, call: int) -> None:
        """Serve queue ``index`` from ``next_avail`` on; ``rings``: the userspace addresses
        of its descriptor table, available and used rings."""
        desc, avail, used = rings
        fcntl.ioctl(self.fd, VHOST_SET_VRING_NUM, _VRING_STATE.pack(index, size))
        fcntl.ioctl(self.fd, VHOST_SET_VRING_BASE, _VRING_STATE.pack(index, next_avail))
        fcntl.ioctl(self.fd, VHOST_SET_VRING_ADDR, _VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        fcntl.ioctl(self.fd, VHOST_SET_VRING_KICK, _VRING_FILE.pack(index, kick))
        fcntl.ioctl(self.fd, VHOST_SET_VRING_CALL, _VRING_FILE.pack(index, call))

    def set_backend(self, index: int, fd: int) -> None:
        """Queue ``index`` sends and receives on tap ``fd``; -1 stops it."""
        fcntl.ioctl(self.fd, VHOST_NET_SET_BACKEND, _VRING_FILE.pack(index, fd))

    def set_guest_cid(self, cid: int) -> None:
        """vhost-vsock: the guest's context ID, unique on the host (EADDRINUSE if taken)."""
        fcntl.ioctl(self.fd, VHOST_VSOCK_SET_GUEST_CID, _U64.pack(cid))

    def set_running(self, running: bool) -> None:
        """vhost-vsock: start or stop carrying the host's sockets on the started queues."""
        fcntl.ioctl(self.fd, VHOST_VSOCK_SET_RUNNING, struct.pack("i", int(running)))

    def stop_vring(self, index: int) -> int:
        """Stop serving queue ``index``; returns where it stood in the available ring."""
        return int(_VRING_STATE.unpack(fcntl.ioctl(self.fd, VHOST_GET_VRING_BASE,
                                                   _VRING_STATE.pack(index, 0)))[1])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
