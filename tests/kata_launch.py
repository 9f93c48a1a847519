"""Run a command as Kata's runtime runs StratoVirt: with the descriptors it opened itself,
inherited (Kata's ExtraFiles): /dev/vhost-vsock with the guest's CID claimed at fd 3, then
taps at fds 4, 5, ...

    python tests/kata_launch.py [--vhost-vsock CID] TAP... -- COMMAND...

Run it inside the network namespace that holds the taps (ip netns exec)."""

from __future__ import annotations

import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA                  # <linux/if_tun.h>
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # <linux/vhost.h>
VHOST_VSOCK_FD, FIRST_TAP_FD = 3, 4


def inherit(fd: int, number: int) -> None:
    """Make ``fd`` descriptor ``number`` in the command (it may be that number already)."""
    if fd == number:
        os.set_inheritable(fd, True)
    else:
        os.dup2(fd, number)             # inheritable
        os.close(fd)


def main() -> None:
    split = sys.argv.index("--")
    args, command = sys.argv[1:split], sys.argv[split + 1:]
    if args[:1] == ["--vhost-vsock"]:
        # As Kata's FindContextID: the CID is claimed on the descriptor the VMM gets.
        fd = os.open("/dev/vhost-vsock", os.O_RDWR)
        fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("<Q", int(args[1])))
        inherit(fd, VHOST_VSOCK_FD)
        args = args[2:]
    for n, name in enumerate(args):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        inherit(fd, FIRST_TAP_FD + n)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
