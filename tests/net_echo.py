"""Echo responder for the probe's net test: run inside the test's network namespace.

Answers every frame of EtherType 0x88B5 on the given interface with a frame
back to its sender whose payload is "echo " + the original payload. No IP.
"""

from __future__ import annotations

import socket
import sys

ETH_P_PROBE = 0x88B5


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
        reply = frame[6:12] + own + frame[12:14] + b"echo " + frame[14:]
        s.send(reply[:1514])


if __name__ == "__main__":
    main()
