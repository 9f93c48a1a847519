"""The network the guest reaches MMDS by, in its NIC's path (Firecracker's ``mmds/ns.rs`` and
``dumbo``): frames the guest sends to the MMDS address are taken here instead of going to the
tap, and what MMDS answers is queued for the guest's receive queue.

It answers ARP requests for the address (from ``MAC``) and serves HTTP over TCP on port 80:
passive opens only, segments taken in order (the path to the guest loses nothing, so nothing
is sent twice), a request head of at most ``RECEIVE_MAX`` bytes, ``MAX_CONNECTIONS`` at a
time (a new one evicts the one idle longest). Anything else sent to the address (ICMP, UDP,
other ports) is dropped, as in Firecracker. Checksums of what the guest sends are not checked
(its frames come from memory, and may carry offloaded, partial ones); those sent are whole.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..config.model import MMDS_ADDRESS
from . import http
from .store import Mmds

MAC = bytes.fromhex("060123456701")           # ns.rs: DEFAULT_MAC_ADDR
PORT = 80
MAX_CONNECTIONS = 30
RECEIVE_MAX = 2500                            # endpoint.rs: RCV_BUF_MAX_SIZE
MAX_QUEUED = 256                              # frames waiting for the guest's receive buffers
MSS_DEFAULT = 536                             # RFC 1122, 4.2.2.6 (dumbo's MSS_DEFAULT)
ETH_ARP, ETH_IPV4, IP_TCP = 0x0806, 0x0800, 6
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class _Connection:
    peer: tuple[bytes, int]         # the guest's address and port
    rcv_nxt: int
    snd_nxt: int
    mss: int
    received: bytearray = field(default_factory=bytearray)
    fin_received: bool = False
    fin_sent: bool = False
    last_active: float = field(default_factory=time.monotonic)


class MmdsStack:
    """One NIC's view of MMDS at ``address``. Called on the NIC's I/O thread only."""

    def __init__(self, mmds: Mmds, address: str = MMDS_ADDRESS) -> None:
        self.mmds = mmds
        self.ip = socket.inet_aton(address)
        self.guest_mac = b"\xff" * 6
        self.outgoing: deque[bytes] = deque()     # Ethernet frames for the guest
        self.counters: collections.Counter[str] = collections.Counter()     # Firecracker's "mmds" metrics
        self._connections: OrderedDict[tuple[bytes, int], _Connection] = OrderedDict()

    # --- from the guest ---
    def is_mmds_frame(self, head: bytes) -> bool:
        """Whether the frame that starts with ``head`` (its first 42 bytes or more) is for MMDS."""
        if len(head) < _ETH.size + 20:
            return False
        kind = struct.unpack_from("!H", head, 12)[0]
        if kind == ETH_ARP:
            return len(head) >= _ETH.size + _ARP.size and head[38:42] == self.ip
        return kind == ETH_IPV4 and head[14] >> 4 == 4 and head[30:34] == self.ip

    def receive(self, frame: bytes) -> None:
        """Take a frame :meth:`is_mmds_frame` said is for MMDS; what is malformed is dropped."""
        self.counters["rx_accepted"] += 1
        src, kind = frame[6:12], struct.unpack_from("!H", frame, 12)[0]
        if kind == ETH_ARP:
            self._arp(frame[_ETH.size:])
            return
        header_len = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        if header_len < 20 or total < header_len or _ETH.size + total > len(frame) or frame[23] != IP_TCP:
            return
        self.guest_mac = src
        packet = frame[_ETH.size:_ETH.size + total]
        self._tcp(packet[12:16], packet[header_len:])

    def _arp(self, arp: bytes) -> None:
        if len(arp) < _ARP.size:
            return
        htype, ptype, hlen, plen, oper, sha, spa, _, tpa = _ARP.unpack_from(arp)
        if (htype, ptype, hlen, plen, oper) != (1, ETH_IPV4, 6, 4, 1) or tpa != self.ip:
            return
        self.guest_mac = sha
        reply = _ARP.pack(1, ETH_IPV4, 6, 4, 2, MAC, self.ip, sha, spa)
        self._queue(_ETH.pack(sha, MAC, ETH_ARP) + reply)

    def _tcp(self, src_ip: bytes, segment: bytes) -> None:
        if len(segment) < _TCP.size:
            return
        sport, dport, seq, ack, offset, flags, _, _, _ = _TCP.unpack_from(segment)
        data_at = (offset >> 4) * 4
        if data_at < _TCP.size or data_at > len(segment):
            return
        payload = segment[data_at:]
        key = (src_ip, sport)
        conn = self._connections.get(key)
        if flags & RST:
            self._connections.pop(key, None)
            return
        if dport != PORT:
            self._send_reset(key, dport, seq, ack, flags, len(payload))
            return
        if conn is None or flags & SYN:
            if flags & (SYN | ACK) != SYN:
                self._send_reset(key, dport, seq, ack, flags, len(payload))
                return
            self._open(key, seq, _mss(segment[_TCP.size:data_at]))
            return
        conn.last_active = time.monotonic()
        self._connections.move_to_end(key)
        if seq != conn.rcv_nxt:          # out of order, or sent again: say where we are
            self._segment(conn, ACK)
            return
        payload = payload[:RECEIVE_MAX - len(conn.received)]     # past the window we gave: not taken
        if payload:
            conn.received += payload
            conn.rcv_nxt = (conn.rcv_nxt + len(payload)) & 0xFFFFFFFF
        if flags & FIN:
            conn.fin_received = True
            conn.rcv_nxt = (conn.rcv_nxt + 1) & 0xFFFFFFFF
        answered = self._serve(conn)
        if len(conn.received) >= RECEIVE_MAX:       # full, and no whole head in it (endpoint.rs)
            self._segment(conn, RST | ACK)
            del self._connections[key]
            return
        if conn.fin_sent and flags & ACK and ack == conn.snd_nxt:
            del self._connections[key]          # our FIN is acknowledged: done
        elif (payload and not answered) or flags & FIN:
            self._segment(conn, ACK | (FIN if conn.fin_received and not conn.fin_sent else 0))
            conn.fin_sent = conn.fin_sent or conn.fin_received

    def _open(self, key: tuple[bytes, int], seq: int, mss: int) -> None:
        if key not in self._connections and len(self._connections) >= MAX_CONNECTIONS:
            self._connections.popitem(last=False)       # the one idle longest
        isn = int.from_bytes(os.urandom(4), "big")
        conn = _Connection(key, (seq + 1) & 0xFFFFFFFF, isn, mss)
        self._connections[key] = conn
        self.counters["connections_created"] += 1
        self._segment(conn, SYN | ACK, options=struct.pack("!BBH", 2, 4, 1460))
        conn.snd_nxt = (isn + 1) & 0xFFFFFFFF

    def _serve(self, conn: _Connection) -> bool:
        """Answer each whole request head received; whether there was one."""
        answered = False
        while (end := _head_end(conn.received)) is not None:
            head, conn.received = bytes(conn.received[:end]), conn.received[end:]
            response = http.respond(self.mmds, head)
            self.counters["rx_count"] += 1
            for at in range(0, len(response), conn.mss):
                self._segment(conn, ACK | PSH, response[at:at + conn.mss])
            answered = True
        return answered

    # --- to the guest ---
    def _segment(self, conn: _Connection, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        src_ip, sport = conn.peer
        offset = (_TCP.size + len(options)) // 4 << 4
        window = RECEIVE_MAX - len(conn.received)
        tcp = _TCP.pack(PORT, sport, conn.snd_nxt, conn.rcv_nxt if flags & ACK else 0, offset, flags, window,
                        0, 0) + options + payload
        conn.snd_nxt = (conn.snd_nxt + len(payload) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        self._ip(src_ip, tcp)

    def _send_reset(self, key: tuple[bytes, int], dport: int, seq: int, ack: int, flags: int,
                    length: int) -> None:
        """RFC 793's reset for a segment that belongs to no connection."""
        src_ip, sport = key
        if flags & ACK:
            tcp = _TCP.pack(dport, sport, ack, 0, 5 << 4, RST, 0, 0, 0)
        else:
            end = (seq + length + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
            tcp = _TCP.pack(dport, sport, 0, end, 5 << 4, RST | ACK, 0, 0, 0)
        self._ip(src_ip, tcp)

    def _ip(self, dst: bytes, tcp: bytes) -> None:
        pseudo = self.ip + dst + struct.pack("!BBH", 0, IP_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        header = _IPV4.pack(0x45, 0, 20 + len(tcp), 0, 0x4000, 64, IP_TCP, 0, self.ip, dst)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        self._queue(_ETH.pack(self.guest_mac, MAC, ETH_IPV4) + header + tcp)

    def _queue(self, frame: bytes) -> None:
        if len(self.outgoing) < MAX_QUEUED:     # a guest that takes nothing loses what is past
            self.outgoing.append(frame)
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += len(frame)
        else:
            self.counters["tx_errors"] += 1


def _mss(options: bytes) -> int:
    """The MSS option of a SYN (RFC 793), or the default."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break
        if kind == 2 and options[i + 1] == 4 and i + 4 <= len(options):
            return max(64, min(1460, struct.unpack_from("!H", options, i + 2)[0]))
        i += options[i + 1]
    return MSS_DEFAULT


def _head_end(data: bytearray) -> int | None:
    """Where a request head ends (after its blank line: "\\n\\n" or "\\n\\r\\n"), or None."""
    i = data.find(b"\n")
    while i != -1 and i + 1 < len(data):
        if data[i + 1:i + 2] == b"\n":
            return i + 2
        if data[i + 1:i + 3] == b"\r\n":
            return i + 3
        i = data.find(b"\n", i + 1)
    return None
