"""Echo responder for the probe's net test: run inside the test's network namespace.

Answers every frame of EtherType 0x88B5 on the given interface with a frame
back to its sender whose payload is "echo " + the original payload; a frame
whose payload starts with "big" is answered with BIG_FRAME bytes (a pattern)
instead, for the guest's mergeable receive buffers. No IP.
"""

from __future__ import annotations

import socket
import sys

ETH_P_PROBE = 0x88B5
BIG_FRAME = 4000


def big_payload(n: int) -> bytes:
    return bytes((i * 13 + 5) & 0xFF for i in range(n))


def main() -> None:
    ifname = sys.argv[1]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PROBE))
    s.bind((ifname, ETH_P_PROBE))
    own = s.getsockname()[4]
    print("ready", flush=True)
    while True:
        frame = s.recv(65536)
        if len(frame) < 14:
            continue
        head = frame[6:12] + own + frame[12:14]
        if frame[14:17] == b"big":
            s.send(head + big_payload(BIG_FRAME - len(head)))
        else:
            s.send((head + b"echo " + frame[14:])[:1514])


if __name__ == "__main__":
    main()
