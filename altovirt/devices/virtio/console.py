"""virtio-console (VIRTIO 1.2, section 5.3), single port, on a unix socket.

The guest's hvc0 talks to one connected client at a time; a second client
is closed at once. Output while no client is connected is consumed and
dropped, so it never blocks the guest; output a slow client cannot take yet
waits in a bounded backlog. Input is paced by the guest's receive buffers:
the socket is not read while the guest has none posted.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

from ...backends.unix import UnixListener
from ...eventloop import EventLoop
from ...memory import GuestMemory
from .device import VIRTIO_ID_CONSOLE, Interrupt, VirtioDevice
from .queue import Queue

log = logging.getLogger(__name__)

RECEIVEQ, TRANSMITQ = 0, 1                  # port 0's queues without VIRTIO_CONSOLE_F_MULTIPORT
QUEUE_SIZE = 256
TX_BACKLOG_LIMIT = 1 << 20


class Console(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name: str, listener: UnixListener, io: EventLoop) -> None:
        super().__init__(name)
        self.config = bytearray(12)         # cols, rows, max_nr_ports, emerg_wr: all 0
        self.listener = listener
        self.io = io
        self.client: socket.socket | None = None
        self._lock = threading.RLock()
        self._backlog = bytearray()
        self._reading = False
        self._registered = False
        io.add(listener.fileno(), self._accept)

    # --- the socket side (I/O thread) ---
    def _accept(self) -> None:
        conn = self.listener.accept()
        if conn is None:
            return
        with self._lock:
            if self.client is not None:
                log.info("%s: refusing a second console client", self.name)
                conn.close()
                return
            self.client = conn
            self._backlog.clear()
            log.info("%s: console client connected", self.name)
            self._watch_client()

    def _watch_client(self) -> None:
        """(Re)arm the client's epoll registration: read while the guest has room, write while
        output waits."""
        if self.client is None:
            return
        fd = self.client.fileno()
        events = 0
        if self.active is not None and not self.broken and self.active.queues[RECEIVEQ].has_available():
            events |= select.EPOLLIN
        if self._backlog:
            events |= select.EPOLLOUT
        self._reading = bool(events & select.EPOLLIN)
        if self._registered:
            self.io.modify(fd, events)
        else:
            self.io.add(fd, self._client_ready, events)
            self._registered = True

    def _drop_client(self) -> None:
        assert self.client is not None
        self.io.remove(self.client.fileno())
        self._registered = False
        self.client.close()
        self.client = None
        self._backlog.clear()
        log.info("%s: console client left", self.name)

    def _client_ready(self) -> None:
        with self._lock:
            if self.client is None:
                return
            if self._backlog and not self._flush():
                return
            if self._reading:
                self._receive()
            elif self._hung_up():
                return
            if self.client is not None:
                self._watch_client()

    def _hung_up(self) -> bool:
        """Woken while not reading: epoll says the client hung up, unless data waits."""
        assert self.client is not None
        try:
            if self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return False
        except BlockingIOError:
            return False
        except OSError:
            pass
        self._drop_client()
        return True

    def _receive(self) -> None:
        """Client bytes straight into the guest's receive buffers."""
        assert self.client is not None and self.active is not None
        queue, interrupt = self.active.queues[RECEIVEQ], self.active.interrupt
        delivered = False
        for chain in self.chains(queue):
            if not chain.writable:
                self.fail("console receive buffer is not device-writable")
                return
            try:
                n = self.client.recv_into(chain.writable[0])
            except BlockingIOError:
                queue.undo_pop()
                break
            except OSError:
                n = 0
            if n == 0:
                queue.undo_pop()
                self._drop_client()
                break
            queue.add_used(chain, n)
            delivered = True
        if delivered:
            interrupt.signal_used(queue)

    def _flush(self) -> bool:
        """Send what waits; False if the client went away."""
        assert self.client is not None
        try:
            sent = self.client.send(self._backlog)
        except BlockingIOError:
            return True
        except OSError:
            self._drop_client()
            return False
        del self._backlog[:sent]
        return True

    # --- the guest side ---
    def activate(self, mem: GuestMemory, queues: list[Queue], interrupt: Interrupt,
                 io: EventLoop) -> None:
        with self._lock:
            super().activate(mem, queues, interrupt, io)
            self._watch_client()

    def queue_notify(self, index: int) -> None:
        with self._lock:
            if index == TRANSMITQ:
                self._transmit()
            self._watch_client()       # new receive buffers: read the client again

    def _transmit(self) -> None:
        assert self.active is not None
        queue, interrupt = self.active.queues[TRANSMITQ], self.active.interrupt
        used = False
        for chain in self.chains(queue):
            if self.client is not None:
                room = TX_BACKLOG_LIMIT - len(self._backlog)
                data = chain.read_all()
                self._backlog += data[:room]
                if len(data) > room:
                    log.debug("%s: client is not reading; %d bytes dropped", self.name, len(data) - room)
            queue.add_used(chain, 0)
            used = True
        if self.client is not None and self._backlog:
            self._flush()
        if used:
            interrupt.signal_used(queue)

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self._watch_client()

    def close(self) -> None:
        with self._lock:
            if self.client is not None:
                self._drop_client()
            self.io.remove(self.listener.fileno())
            self.listener.close()
