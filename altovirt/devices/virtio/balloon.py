"""virtio-balloon (virtio 1.2, 5.5), as Firecracker's: the host sets a target, the guest gives
pages (inflate) and takes them back (deflate), reports statistics and, if offered, its free
pages; pages given or reported free go back to the host (madvise), so the VMM's memory
shrinks by them.

Queues, in order, those the features offer: inflateq, deflateq, statsq (with
``stats_polling_interval_s``), free_page_vq (with ``free_page_hinting``), reporting_vq (with
``free_page_reporting``). The guest keeps one stats buffer with the device, which hands it
back each polling interval to have it filled again (5.5.6.3).

Free page hinting (5.5.6.6), as Firecracker's: the host starts a run by writing a new command
id to ``free_page_hint_cmd_id``; the guest sends that id, then its free pages, then STOP; the
pages of the current run go back to the host, and the host writes DONE (at the guest's STOP,
or when asked) for the guest to take them back.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ...config.model import PAGES_PER_MIB, BalloonConfig
from ...errors import AltoVirtError
from ...eventloop import EventLoop
from ...memory import PAGE_SHIFT, GuestMemory, GuestMemoryError
from .device import COMMON_FEATURES, VIRTIO_MMIO_INT_CONFIG, Interrupt, VirtioDevice
from .queue import DescriptorChain, Queue

log = logging.getLogger(__name__)

VIRTIO_ID_BALLOON = 5
# Feature bits (5.5.3)
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_REPORTING = 5
# free_page_hint_cmd_id's own values (Linux's VIRTIO_BALLOON_CMD_ID_STOP and _DONE); a run's are 2 on.
CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_LEN = 4                          # a hint buffer of this length is a command id, not pages
QUEUE_SIZE = 256
MAX_PFNS_IN_CHAIN = 256                 # Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX; more is malformed
_CONFIG = struct.Struct("<III")         # num_pages, actual, free_page_hint_cmd_id (5.5.4)
_STAT = struct.Struct("<HQ")            # struct virtio_balloon_stat: tag, value (packed)
# 5.5.6.3's tags, and Linux's later ones, by the names Firecracker's statistics give them.
STAT_NAMES = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
              "available_memory", "disk_caches", "hugetlb_allocations", "hugetlb_failures", "oom_kill",
              "alloc_stall", "async_scan", "direct_scan", "async_reclaim", "direct_reclaim")


class BalloonError(AltoVirtError):
    """A change the balloon cannot take."""


@dataclass
class HintingState:
    """A free page hinting run: the id the host asked for, the last it made, the last the guest
    sent (None: none yet), and whether the guest's STOP ends the run (DONE) at once."""

    host_cmd: int = CMD_ID_STOP
    last_cmd_id: int = CMD_ID_STOP
    guest_cmd: int | None = None
    acknowledge_on_stop: bool = True


class Balloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON

    def __init__(self, name: str, cfg: BalloonConfig, on_actual: Callable[[int], None] | None = None) -> None:
        """``on_actual(pages)``: the guest says it holds this many pages now (QMP's BALLOON_CHANGE)."""
        super().__init__(name)
        self.cfg = cfg
        self._stats: dict[str, int] = {}        # the guest's last (what it holds is in config)
        self._on_actual = on_actual
        queues = 2 + sum(map(bool, (cfg.stats_polling_interval_s, cfg.free_page_hinting,
                                    cfg.free_page_reporting)))
        self.queue_sizes = (QUEUE_SIZE,) * queues
        self.config = bytearray(_CONFIG.pack(cfg.amount_mib * PAGES_PER_MIB, 0, 0))
        self._lock = threading.Lock()
        self._stats_chain: DescriptorChain | None = None     # the guest's stats buffer, held
        self._io: EventLoop | None = None
        self._timer = 0
        self.hinting = HintingState()

    @property
    def stats_queue(self) -> int | None:
        return 2 if self.cfg.stats_polling_interval_s else None

    @property
    def hinting_queue(self) -> int | None:
        return 2 + bool(self.cfg.stats_polling_interval_s) if self.cfg.free_page_hinting else None

    @property
    def reporting_queue(self) -> int | None:
        return len(self.queue_sizes) - 1 if self.cfg.free_page_reporting else None

    def device_features(self) -> int:
        f = COMMON_FEATURES
        if self.cfg.stats_polling_interval_s:
            f |= 1 << VIRTIO_BALLOON_F_STATS_VQ
        if self.cfg.deflate_on_oom:
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if self.cfg.free_page_reporting:
            f |= 1 << VIRTIO_BALLOON_F_REPORTING
        if self.cfg.free_page_hinting:
            f |= 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT
        return f

    # --- the host ---
    def set_target(self, pages: int) -> None:
        """Ask the guest for a balloon of ``pages`` (a configuration change, 5.5.6)."""
        with self._lock:
            self.cfg.amount_mib = pages // PAGES_PER_MIB
            struct.pack_into("<I", self.config, 0, pages)
            active = self.active
        if active is not None:
            active.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    def set_stats_interval(self, seconds: int) -> None:
        """A new polling interval, from the next poll on. Statistics cannot be turned on or off
        (their queue is there or not from the start): BalloonError, as Firecracker's
        StatisticsStateChange."""
        with self._lock:
            if bool(seconds) != bool(self.cfg.stats_polling_interval_s):
                raise BalloonError("Statistics cannot be enabled/disabled after activation.")
            self.cfg.stats_polling_interval_s = seconds
            self._timer += 1
            timer = self._timer
        if self._io is not None:
            self._io.call_later(0, lambda: self._schedule_stats(timer))

    def start_hinting(self, acknowledge_on_stop: bool = True) -> None:
        """Start a run of free page hinting: a new command id for the guest (2 on, wrapping)."""
        with self._lock:
            self._can_hint()
            cmd = (self.hinting.last_cmd_id + 1) & 0xFFFFFFFF
            self.hinting.last_cmd_id = cmd if cmd > CMD_ID_DONE else CMD_ID_DONE + 1
            self.hinting.acknowledge_on_stop = acknowledge_on_stop
        self._set_hint_cmd(self.hinting.last_cmd_id)

    def stop_hinting(self) -> None:
        """End the run: DONE, and the guest takes the pages it hinted back."""
        with self._lock:
            self._can_hint()
        self._set_hint_cmd(CMD_ID_DONE)

    def hinting_status(self) -> dict[str, int | None]:
        """Firecracker's: the id the host asked for, the one the guest sent last."""
        with self._lock:
            self._can_hint(active=False)
            return {"host_cmd": self.hinting.host_cmd, "guest_cmd": self.hinting.guest_cmd}

    def _can_hint(self, active: bool = True) -> None:
        if not self.cfg.free_page_hinting:
            raise BalloonError("Attempting to use hinting when not enabled")
        if active and self.active is None:
            raise BalloonError("Device not activated yet.")

    def _set_hint_cmd(self, cmd: int) -> None:
        with self._lock:
            self.hinting.host_cmd = cmd
            struct.pack_into("<I", self.config, 8, cmd)
            active = self.active
        if active is not None:
            active.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    @property
    def target_pages(self) -> int:
        return int(struct.unpack_from("<I", self.config, 0)[0])

    @property
    def actual_pages(self) -> int:
        return int(struct.unpack_from("<I", self.config, 4)[0])

    def info(self) -> dict[str, int]:
        """Firecracker's statistics (target and actual, in pages and MiB, then the guest's
        figures), and the settings."""
        with self._lock:
            stats = dict(self._stats)
        target, actual = self.target_pages, self.actual_pages
        return {"target_pages": target, "actual_pages": actual, "target_mib": target // PAGES_PER_MIB,
                "actual_mib": actual // PAGES_PER_MIB, **stats}

    # --- the guest ---
    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver writes ``actual`` (5.5.6: the pages it now holds)."""
        if offset != 4 or size != 4:
            return
        with self._lock:
            changed = value != self.actual_pages
            struct.pack_into("<I", self.config, 4, value)
        if changed and self._on_actual is not None:
            self._on_actual(value)

    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt, io: EventLoop) -> None:
        super().activate(mem, queues, interrupt, io)
        self._io = io
        self._timer += 1
        if self.cfg.stats_polling_interval_s:
            self._schedule_stats(self._timer)

    def reset(self) -> None:
        with self._lock:
            self._stats_chain = None
            self._timer += 1          # the polling timer of the old activation does nothing
        super().reset()

    def queue_notify(self, index: int) -> None:
        assert self.active is not None
        queue, mem = self.active.queues[index], self.active.mem
        if index == self.stats_queue:
            self._take_stats(queue, mem)
            return
        if index == self.hinting_queue:
            self._take_hints(queue, mem)
            return
        used = False
        for chain in self.chains(queue):
            if index == 0:
                self.counters["inflate_count"] += 1
                self._inflate(chain, mem)
            elif index == self.reporting_queue:
                self.counters["free_page_report_count"] += 1
                self.counters["free_page_report_freed"] += sum(chain.lengths)
                self._report(chain, mem)
            else:
                self.counters["deflate_count"] += 1
            queue.add_used(chain, 0)        # deflate: the guest takes its pages back as they are
            used = True
        if used:
            self.active.interrupt.signal_used(queue)

    def _inflate(self, chain: DescriptorChain, mem: GuestMemory) -> None:
        data = chain.read_all()
        if len(data) % 4 or len(data) > 4 * MAX_PFNS_IN_CHAIN or chain.writable_len:
            log.warning("%s: an inflate buffer of %d bytes is not a list of page numbers; skipped",
                        self.name, len(data))
            return
        pfns = sorted(struct.unpack(f"<{len(data) // 4}I", data))
        start = previous = None
        for pfn in [*pfns, None]:               # contiguous pages go back in one call
            if pfn is not None and previous is not None and pfn == previous + 1:
                previous = pfn
                continue
            if start is not None and previous is not None:
                self._discard(start << PAGE_SHIFT, (previous - start + 1) << PAGE_SHIFT, mem)
            start = previous = pfn

    def _take_hints(self, queue: Queue, mem: GuestMemory) -> None:
        """A buffer of 4 bytes is the guest's command id (the run it hints for, or STOP); the
        others are free pages, given back if they are of the run the host asked for."""
        done, used = False, False
        for chain in self.chains(queue):
            for gpa, length in zip(chain.addrs, chain.lengths, strict=True):
                if length == CMD_ID_LEN:
                    try:
                        cmd = int.from_bytes(mem.read(gpa, CMD_ID_LEN), "little")
                    except GuestMemoryError as e:
                        self.fail(f"free page hint command id: {e}")
                        return
                    with self._lock:
                        self.hinting.guest_cmd = cmd
                    done = cmd in (CMD_ID_STOP, CMD_ID_DONE)
                elif self.hinting.host_cmd > CMD_ID_DONE and self.hinting.guest_cmd == self.hinting.host_cmd:
                    self.counters["free_page_hint_count"] += 1
                    self.counters["free_page_hint_freed"] += length
                    self._discard(gpa, length, mem)
            queue.add_used(chain, 0)
            used = True
        if used:
            assert self.active is not None
            self.active.interrupt.signal_used(queue)
        if done and self.hinting.acknowledge_on_stop and self.hinting.host_cmd > CMD_ID_DONE:
            self._set_hint_cmd(CMD_ID_DONE)

    def _report(self, chain: DescriptorChain, mem: GuestMemory) -> None:
        for gpa, length in zip(chain.addrs, chain.lengths, strict=True):
            self._discard(gpa, length, mem)

    def _discard(self, gpa: int, length: int, mem: GuestMemory) -> None:
        try:
            mem.discard_range(gpa, length)
        except GuestMemoryError as e:
            log.warning("%s: %s; those pages stay", self.name, e)

    def _take_stats(self, queue: Queue, mem: GuestMemory) -> None:
        for chain in self.chains(queue):
            data = chain.read_all()
            stats = {}
            for at in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, at)
                if tag < len(STAT_NAMES):
                    stats[STAT_NAMES[tag]] = value
            self.counters["stats_updates_count"] += 1
            with self._lock:
                previous, self._stats_chain = self._stats_chain, chain
                self._stats = stats
            if previous is not None:    # a driver that posts two: the older goes back (5.5.6.3)
                queue.add_used(previous, 0)
                assert self.active is not None
                self.active.interrupt.signal_used(queue)

    def _schedule_stats(self, timer: int) -> None:
        if self._io is not None and self.cfg.stats_polling_interval_s:
            self._io.call_later(self.cfg.stats_polling_interval_s, lambda: self._poll_stats(timer))

    def _poll_stats(self, timer: int) -> None:
        """Hand the stats buffer back, for the guest to fill with fresh figures (I/O thread)."""
        if timer != self._timer:
            return
        with self._lock:
            chain, self._stats_chain = self._stats_chain, None
        active = self.active
        if chain is not None and active is not None and not self.broken:
            queue = active.queues[2]
            queue.add_used(chain, 0)
            active.interrupt.signal_used(queue)
        self._schedule_stats(timer)

    def prepare_save(self) -> None:
        """The held stats buffer goes back to the guest, which posts it again."""
        with self._lock:
            chain, self._stats_chain = self._stats_chain, None
        if chain is not None and self.active is not None:
            self.active.queues[2].add_used(chain, 0)
