"""Run a command as Kata's runtime runs StratoVirt: with taps it opened itself, inherited
as file descriptors 4, 5, ... (Kata's ExtraFiles; 3 is its vhost-vsock descriptor).

    python tests/kata_launch.py TAP... -- COMMAND...

Run it inside the network namespace that holds the taps (ip netns exec)."""

from __future__ import annotations

import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA                  # <linux/if_tun.h>
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
FIRST_TAP_FD = 4


def main() -> None:
    split = sys.argv.index("--")
    taps, command = sys.argv[1:split], sys.argv[split + 1:]
    for n, name in enumerate(taps):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        os.dup2(fd, FIRST_TAP_FD + n)   # inheritable
        os.close(fd)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
