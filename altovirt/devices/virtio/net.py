"""virtio-net (VIRTIO 1.2, section 5.1) on a host tap, one queue pair.

TX: each chain is a virtio_net_hdr_v1 and a frame, written to the tap as
they lie in guest RAM (one writev per frame; a notification takes every
frame the guest queued, and raises one interrupt; the driver is asked not to
notify while frames are being sent). RX: a frame is read from
the tap straight into the guest's receive buffers; with
VIRTIO_NET_F_MRG_RXBUF a large (GSO) frame spans several buffers and the
header's num_buffers says how many. The device holds enough popped buffers
for the largest frame, and a frame completes only those it fills, so each
buffer is popped once however small the frames are. The tap is not read while
the guest has no receive buffers posted, so the guest paces reception.

Checksum and TSO offloads the guest accepts are passed on to the tap with
TUNSETOFFLOAD, so segmentation and checksums happen once, in the host kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING

from ...backends.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_SIZE, Tap
from ...config.model import RateLimiterConfig
from ...eventloop import EventLoop
from ...memory import GuestMemory
from ..rate_limiter import RateLimiter
from .device import COMMON_FEATURES, VIRTIO_ID_NET, Interrupt, VirtioDevice
from .queue import DescriptorChain, Queue, QueueError, read_at, write_at

if TYPE_CHECKING:
    from ...mmds.stack import MmdsStack

log = logging.getLogger(__name__)

# Feature bits (5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

RXQ, TXQ = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65562               # a 64 KiB GSO frame, its Ethernet header and the vnet header
# Receive buffers taken at a time: about what a 64 KiB frame fills of the page-sized buffers
# Linux posts under such traffic (drivers/net/virtio_net.c, get_mergeable_buf_len).
RX_BATCH = 16
MMDS_HEAD = 42                  # bytes of a frame that say whether it is for MMDS (mmds/stack.py)
NUM_BUFFERS_OFFSET = 10         # in struct virtio_net_hdr_v1
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu
_NUM_BUFFERS = struct.Struct("<H")

# After a migration, QEMU announces each NIC with RARP requests (net/announce.c), so that the
# switches between here and the guest's peers learn its new port before the guest sends
# anything; its defaults: 5 rounds, the first at once, then 50 ms apart growing by 100 ms, at
# most 550 ms.
ETH_P_RARP = 0x8035
ARPOP_RREQUEST = 3                  # RFC 903: "request reverse"
_RARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")
ANNOUNCE_ROUNDS = 5
ANNOUNCE_INITIAL, ANNOUNCE_STEP, ANNOUNCE_MAX = 0.05, 0.1, 0.55


def parse_mac(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


def rarp_announce(mac: bytes) -> bytes:
    """A broadcast RARP request for ``mac`` from ``mac``, padded to Ethernet's 60 bytes."""
    frame = _RARP.pack(b"\xff" * 6, mac, ETH_P_RARP, 1, 0x0800, 6, 4, ARPOP_RREQUEST,
                       mac, bytes(4), mac, bytes(4))
    return frame.ljust(60, b"\0")


def random_mac() -> str:
    """A locally administered unicast address in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


class Net(VirtioDevice):
    device_id = VIRTIO_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name: str, tap: Tap | None, mac: str | None, io: EventLoop,
                 rx_rate_limiter: RateLimiterConfig | None = None,
                 tx_rate_limiter: RateLimiterConfig | None = None, mmds: MmdsStack | None = None) -> None:
        """``tap`` None is an empty hot-plug slot: the link is down and frames sent are dropped.
        ``mac`` None: one is made up (:func:`random_mac`), which a restore replaces with the saved one.
        The rate limiters take an operation and the frame's bytes for each frame received
        (``rx``) or sent (``tx``), as Firecracker's. With ``mmds``, frames the guest sends to
        the metadata service go to it, not the tap, and its answers come first to the guest."""
        super().__init__(name)
        self.mmds = mmds
        self.tap = tap
        self.mac_generated = mac is None
        self.mac = mac = mac or random_mac()
        self.io = io
        self.rx_rate_limiter = RateLimiter(rx_rate_limiter, self._rx_unthrottled)
        self.tx_rate_limiter = RateLimiter(tx_rate_limiter, self._tx_unthrottled)
        self.rx_rate_limiter.attach(io)
        self.tx_rate_limiter.attach(io)
        status = VIRTIO_NET_S_LINK_UP if tap else 0
        self.config = bytearray(_CONFIG.pack(parse_mac(mac), status, 1, 0))
        self._lock = threading.Lock()
        self._reading = False
        self._registered = False
        self._rx_held: deque[tuple[DescriptorChain, int, int]] = deque()  # chain, its views, bytes
        self._rx_views: list[memoryview] = []   # the held chains' buffers, in order
        self._rx_room = 0
        # A frame read while the held buffers could not take the largest one, that did not fit
        # in them: it waits here for more buffers (the tap is not read meanwhile).
        self._rx_deferred: bytes | None = None
        # Guest offloads only where the tap takes them (checked once, then reset). An empty
        # slot offers them, as every Linux tap takes them, for the tap plugged in later.
        self._tap_offloads = True
        if tap is not None:
            self._tap_offloads = tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            tap.set_offload(0)

    def adopt_config(self, saved: bytes) -> None:
        """A MAC made up here gives way to the saved one: the guest knows that one."""
        if self.mac_generated and len(saved) == len(self.config) and saved[6:] == self.config[6:]:
            self.config[:6] = saved[:6]
            self.mac = ":".join(f"{b:02x}" for b in saved[:6])

    def device_features(self) -> int:
        f = COMMON_FEATURES | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        f |= 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_CSUM
        f |= 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN
        if self._tap_offloads:
            f |= 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 \
                | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN
        return f

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        with self._lock:
            super().activate(mem, queues, interrupt, io)
            self._release_held()
            offload = 0
            if self.features >> VIRTIO_NET_F_GUEST_CSUM & 1:
                offload |= TUN_F_CSUM
                for bit, flag in ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                                  (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                                  (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN)):
                    if self.features >> bit & 1:
                        offload |= flag
            if self.tap is not None:
                self.tap.set_offload(offload)
            self._watch_tap()

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self.rx_rate_limiter.reset()
            self.tx_rate_limiter.reset()
            self._release_held()
            self._watch_tap()

    def _rx_unthrottled(self) -> None:
        self._tap_readable()

    def _tx_unthrottled(self) -> None:
        with self._lock:
            if self.active is not None and not self.broken:
                self._transmit()

    def prepare_save(self) -> None:
        """The receive buffers held are given back: they are the last ones taken, untouched.
        A frame waiting for buffers is dropped (a peer's TCP sends it again)."""
        with self._lock:
            if self.active is not None and self._rx_held:
                self.active.queues[RXQ].undo_pop(len(self._rx_held))
            self._release_held()
            self._watch_tap()

    def _release_held(self) -> None:
        """Forget the receive buffers held: the driver owns them again once the queue is reset.
        A deferred frame is dropped, as a frame on the wire can be."""
        self._rx_held.clear()
        self._rx_views.clear()
        self._rx_room = 0
        self._rx_deferred = None

    def _watch_tap(self) -> None:
        """Read the tap only while the guest has receive buffers (it paces reception)."""
        if self.tap is None:
            return
        want = self.active is not None and not self.broken and self._rx_deferred is None \
            and not self.rx_rate_limiter.blocked \
            and (bool(self._rx_held) or self.active.queues[RXQ].has_available())
        if want == self._reading and self._registered:
            return
        self._reading = want
        events = select.EPOLLIN if want else 0
        if self._registered:
            self.io.modify(self.tap.fd, events)
        else:
            self.io.add(self.tap.fd, self._tap_readable, events)
            self._registered = True

    # --- I/O thread ---
    def queue_notify(self, index: int) -> None:
        with self._lock:
            if index == TXQ:
                self._transmit()
            if self._frame_waiting() and self.active is not None and not self.broken:
                self._receive()             # new buffers, or MMDS's answers
            self._watch_tap()

    def _transmit(self) -> None:
        assert self.active is not None
        queue, interrupt = self.active.queues[TXQ], self.active.interrupt
        sent = False
        # No notifications while we send (as QEMU's virtio-net): frames the driver adds in the
        # meantime are taken by the look after turning them back on, without a kick each.
        queue.notifications(False)
        while True:
            stalled = False
            for chain in self.chains(queue):
                if chain.readable_count != len(chain.lengths):
                    self.fail("transmit chain with device-writable buffers")
                    break
                size = sum(chain.lengths)
                if self.tx_rate_limiter.active and not self.tx_rate_limiter.consume(size):
                    queue.undo_pop()        # sent when the limiter's timer says so
                    self.counters["tx_rate_limiter_throttled"] += 1
                    stalled = True
                    break
                self.counters["tx_packets_count"] += 1
                self.counters["tx_bytes_count"] += size - VNET_HDR_SIZE
                if self.mmds is not None and self._to_mmds(chain.views):
                    queue.add_used(chain, 0)
                    sent = True
                    continue
                try:
                    if self.tap is not None:    # no tap: the cable is out, the frame is lost
                        os.writev(self.tap.fd, chain.views)
                except BlockingIOError:
                    queue.undo_pop()        # the tap is full: try again on the next notify
                    stalled = True
                    break
                except OSError as e:
                    log.debug("%s: tap write failed: %s (frame dropped)", self.name, e)
                queue.add_used(chain, 0)
                sent = True
            queue.notifications(True)
            if stalled or self.broken or not queue.has_available():
                break
            queue.notifications(False)
        if sent:
            interrupt.signal_used(queue)

    def _frame_waiting(self) -> bool:
        """A frame for the guest that is not on the tap: one read aside, or MMDS's."""
        return self._rx_deferred is not None or (self.mmds is not None and bool(self.mmds.outgoing))

    def _to_mmds(self, views: list[memoryview]) -> bool:
        """Give the frame in ``views`` (after its virtio-net header) to MMDS if it is for it."""
        assert self.mmds is not None
        if not self.mmds.is_mmds_frame(read_at(views, VNET_HDR_SIZE + MMDS_HEAD)[VNET_HDR_SIZE:]):
            return False
        self.mmds.receive(read_at(views, sum(len(v) for v in views))[VNET_HDR_SIZE:])
        return True

    def _tap_readable(self) -> None:
        with self._lock:
            if self.active is not None and not self.broken and self.tap is not None:
                self._receive()
                self._watch_tap()

    def _receive(self) -> None:
        """Frames from the tap into the held receive buffers, zero-copy while they can take
        the largest frame. Short of that (the driver is slow to post buffers), a frame is read
        aside and waits for enough buffers: a frame cut to fit would reach the guest whole in
        its header's eyes (5.1.6.4: the device waits for buffers, as QEMU's and
        Firecracker's do)."""
        assert self.active is not None and self.tap is not None
        queue, interrupt = self.active.queues[RXQ], self.active.interrupt
        mergeable = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        held, views = self._rx_held, self._rx_views
        delivered = False
        try:
            while True:
                # Hold enough buffers for the largest frame (one chain without MRG_RXBUF); those
                # a frame does not reach stay held for the next one, so each is popped once.
                while self._rx_room < MAX_FRAME and (mergeable or not held):
                    chains = queue.pop_many(RX_BATCH if mergeable else 1)
                    if not chains:
                        break
                    for chain in chains:
                        size = sum(chain.lengths)
                        if chain.readable_count or size < VNET_HDR_SIZE:
                            # 5.1.6.3.1: every receive buffer holds at least the header
                            raise QueueError("receive buffer is not device-writable or smaller than "
                                             "the virtio-net header")
                        held.append((chain, len(chain.lengths), size))
                        views += chain.views
                        self._rx_room += size
                if not held or self.rx_rate_limiter.blocked:
                    break
                frame = self._rx_deferred
                if frame is None and self.mmds is not None and self.mmds.outgoing:
                    frame = bytes(VNET_HDR_SIZE) + self.mmds.outgoing.popleft()
                n = 0
                if frame is None:
                    try:
                        if self._rx_room >= MAX_FRAME or not mergeable:
                            n = os.readv(self.tap.fd, views)
                        else:
                            frame = os.read(self.tap.fd, MAX_FRAME)
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                            log.debug("%s: tap read failed: %s", self.name, e)
                        break
                if frame is not None:
                    self._rx_deferred = None
                    if len(frame) > self._rx_room:
                        if len(held) < queue.size:
                            self._rx_deferred = frame       # until the driver posts more
                            break
                        log.debug("%s: a frame of %d bytes is larger than the whole receive "
                                  "queue (%d bytes); dropped", self.name, len(frame), self._rx_room)
                        continue
                    n = len(frame)
                if self.rx_rate_limiter.active and not self.rx_rate_limiter.consume(n):
                    # Not the guest's yet: the frame waits, aside, for the limiter's timer.
                    self.counters["rx_rate_limiter_throttled"] += 1
                    self._rx_deferred = frame if frame is not None else read_at(views, n)
                    break
                if frame is not None:
                    write_at(views, 0, frame)
                self._use_held(queue, n)
                self.counters["rx_packets_count"] += 1
                self.counters["rx_bytes_count"] += n - VNET_HDR_SIZE
                delivered = True
        except QueueError as e:
            self.fail(str(e))
        if delivered:
            interrupt.signal_used(queue)

    def _use_held(self, queue: Queue, n: int) -> None:
        """Give the driver the held buffers a frame of ``n`` bytes filled, in order (the last
        one partly), with num_buffers in the first (the tap fills only the 10-byte legacy
        header: 5.1.6.4). Written before the chains are used: using one notes it as written."""
        held, views = self._rx_held, self._rx_views
        count = nviews = 0
        left = n
        while left > 0:
            left -= held[count][2]
            nviews += held[count][1]
            count += 1
        write_at(views, NUM_BUFFERS_OFFSET, _NUM_BUFFERS.pack(count))
        left = n
        for _ in range(count):
            chain, _, size = held.popleft()
            queue.add_used(chain, min(left, size), publish=False)
            left -= size
            self._rx_room -= size
        queue.publish_used()
        del views[:nviews]

    def announce(self) -> None:
        """Announce this NIC on its tap (a migrated VM has come up here), as QEMU does: RARP
        rounds sent from the I/O thread, which starts once device work runs (cont)."""
        frame = bytes(VNET_HDR_SIZE) + rarp_announce(parse_mac(self.mac))

        def send(done: int) -> None:
            tap = self.tap
            if tap is None or tap.fd < 0:
                return                          # unplugged or closed meanwhile
            try:
                os.write(tap.fd, frame)
            except OSError as e:
                log.warning("%s: cannot announce the NIC on tap %s: %s", self.name, tap.name, e.strerror)
                return
            if done + 1 < ANNOUNCE_ROUNDS:
                delay = min(ANNOUNCE_INITIAL + done * ANNOUNCE_STEP, ANNOUNCE_MAX)
                self.io.call_later(delay, lambda: send(done + 1))

        self.io.call_later(0, lambda: send(0))

    def detach(self) -> None:
        if self._registered and self.tap is not None:
            self.io.remove(self.tap.fd)
            self._registered = False

    def close(self) -> None:
        self.detach()
        if self.tap is not None:
            self.tap.close()
