"""A host tap device with virtio-net headers (Documentation/networking/tuntap.rst).

The tap must exist already (``ip tuntap add dev tap0 mode tap``) and must not
be attached to another process: AltoVirt never creates host interfaces. It
is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so every frame read or
written carries the 12-byte virtio_net_hdr_v1 that the guest uses too, and
frames move between the tap and guest RAM with readv/writev, uncopied.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from . import BackendError

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFNAMSIZ = 16
VNET_HDR_SIZE = 12              # struct virtio_net_hdr_v1 (with num_buffers)
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")


class Tap:
    def __init__(self, name: str) -> None:
        self.name = name
        # Checked first because TUNSETIFF would create a missing tap (given CAP_NET_ADMIN);
        # asked through a socket ioctl, not /sys, which a jail does not have.
        try:
            socket.if_nametoindex(name)
        except OSError as e:
            raise BackendError(errno.ENODEV, f"tap {name} does not exist; create it first "
                                             f"(ip tuntap add dev {name} mode tap)") from e
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(e.errno, f"/dev/net/tun: {e.strerror}") from e
        try:
            ifr = _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EBUSY:
                raise BackendError(e.errno, f"tap {name} is in use by another process") from e
            if e.errno == errno.EINVAL:
                # What TUNSETIFF says of an existing interface that is not a tap.
                raise BackendError(e.errno, f"{name} is not a tap device") from e
            raise BackendError(e.errno, f"tap {name}: {e.strerror}") from e

    @classmethod
    def from_fd(cls, fd: int) -> Tap:
        """Adopt a tap someone else opened (an fd passed over QMP): it must be a tap
        with virtio-net headers and no packet information. The fd is ours on success."""
        try:
            ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        except OSError as e:
            raise BackendError(e.errno, f"fd {fd} is not an attached tap ({e.strerror})") from e
        raw, flags = _IFREQ.unpack(ifr)
        name = raw.rstrip(b"\0").decode(errors="replace")
        if flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) != IFF_TAP | IFF_NO_PI | IFF_VNET_HDR:
            raise BackendError(errno.EINVAL, f"fd {fd} ({name}) is not a tap opened with "
                                             "IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            os.set_blocking(fd, False)
        except OSError as e:
            raise BackendError(e.errno, f"tap {name}: {e.strerror}") from e
        tap = cls.__new__(cls)
        tap.name, tap.fd = name, fd
        return tap

    def set_offload(self, flags: int) -> bool:
        """Tell the tap which offloads the guest accepts; False if the tap refuses them."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            return True
        except OSError:
            return False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
