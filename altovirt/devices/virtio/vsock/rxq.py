"""What waits for the guest's receive buffers: the muxer's bounded queue (Firecracker's
unix/muxer_rxq.rs).

It holds at most RXQ_SIZE entries, each a connection with something to say (its control
packets are flags on it, built when sent) or an RST for a packet of no connection. A full
queue goes out of sync: once drained, it is refilled by a walk of the connections; an RST that
finds it full of RSTs is dropped (the guest's packet went nowhere, and its connect or send
times out).
"""

from __future__ import annotations

import collections
from collections.abc import Collection

from .connection import Conn

RXQ_SIZE = 256                      # entries waiting for the guest's receive buffers (MUXER_RXQ_SIZE)


class RxQueue:
    """Connections, and (host port, guest port) RSTs, in the order they go to the guest."""

    def __init__(self) -> None:
        self.entries: collections.deque[Conn | tuple[int, int]] = collections.deque()
        self.synced = True              # every connection with something to say is in entries
        self.rsts = 0                   # how many entries are RSTs
        self.dropped = 0                # RSTs dropped since the queue was last drained
        self._scan_from = 0             # where the next walk of the connections starts

    def push(self, conn: Conn) -> None:
        """Queue ``conn``, which has something for the guest. A full queue does not grow: it
        goes out of sync, and ``conn`` is found by the walk that refills it (Firecracker's
        muxer: MuxerRxQ::push of a ConnRx)."""
        if conn.queued:
            return
        if self.synced and len(self.entries) < RXQ_SIZE:
            self.entries.append(conn)
            conn.queued = True
        else:
            self.synced = False

    def push_rst(self, host_port: int, guest_port: int) -> bool:
        """Queue an RST for a guest packet of no connection; False if it is dropped. It has no
        other home: in a full queue it takes the place of the newest connection entry (the
        queue goes out of sync), and it is dropped if there is none (Firecracker's muxer:
        MuxerRxQ::push of an RstPkt)."""
        entries = self.entries
        if len(entries) >= RXQ_SIZE:
            if self.rsts >= len(entries):
                self.dropped += 1
                return False
            for i in range(len(entries) - 1, -1, -1):
                entry = entries[i]
                if isinstance(entry, Conn):
                    entry.queued, self.synced = False, False
                    entries[i] = (host_port, guest_port)
                    break
        else:
            entries.append((host_port, guest_port))
        self.rsts += 1
        return True

    def pop(self) -> None:
        """The first entry has gone to the guest."""
        entry = self.entries.popleft()
        if isinstance(entry, Conn):
            entry.queued = False
        else:
            self.rsts -= 1

    def resync(self, conns: Collection[Conn]) -> None:
        """Refill the drained, out-of-sync queue with the connections that have something for
        the guest; it stays out of sync if they do not all fit (Firecracker's muxer:
        MuxerRxQ::from_conn_map). The walk starts where the last one stopped, so that no
        connection waits behind the same RXQ_SIZE others every time."""
        listed = list(conns)
        self.synced = True
        start = self._scan_from % len(listed) if listed else 0
        for i in range(len(listed)):
            conn = listed[(start + i) % len(listed)]
            if conn.wants_rx():
                if len(self.entries) >= RXQ_SIZE:
                    self.synced, self._scan_from = False, start + i
                    return
                self.entries.append(conn)
                conn.queued = True

    def clear(self) -> None:
        self.entries.clear()
        self.synced, self.rsts, self.dropped = True, 0, 0
