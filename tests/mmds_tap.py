"""MMDS's network stack behind a tap, for tests: run in a network namespace, it makes tap
``mm0`` (169.254.0.2/16 on the host's side), then gives every frame the kernel sends to the
MMDS address to an MmdsStack and writes back what that answers, so that the kernel's own TCP
and ARP, and real clients (curl), talk to it. Its store is read from argv[1] (JSON: version,
data). Prints "ready" once the tap is up; runs until killed."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys

from altovirt.backends.tap import IFF_NO_PI, IFF_TAP, TUNSETIFF
from altovirt.mmds.stack import MmdsStack
from altovirt.mmds.store import Mmds


def main() -> None:
    settings = json.loads(sys.argv[1])
    store = Mmds()
    store.version = settings.get("version", "V1")
    store.put(settings["data"])
    stack = MmdsStack(store)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"mm0", IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "addr", "add", "169.254.0.2/16", "dev", "mm0"], check=True)
    subprocess.run(["ip", "link", "set", "mm0", "up"], check=True)
    print("ready", flush=True)
    while True:
        select.select([fd], [], [])
        frame = os.read(fd, 65536)
        if stack.is_mmds_frame(frame[:42]):
            stack.receive(frame)
        while stack.outgoing:
            os.write(fd, stack.outgoing.popleft())


if __name__ == "__main__":
    main()
