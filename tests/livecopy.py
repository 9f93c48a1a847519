"""A live migration's RAM copy, run by a test step by step: the source's dirty log on a real
KVM VM over the test's guest RAM, its sender, and a destination receiving into RAM of its own
through the real stream (vmm/precopy.py), over a socket pair."""

from __future__ import annotations

import socket
import threading

from altovirt.kvm import Kvm
from altovirt.memory import GuestMemory
from altovirt.vmm import precopy


class LiveCopy:
    """Start with :meth:`first_pass`, then :meth:`next_pass` as often as the test likes,
    and :meth:`finish` to have the destination's RAM (a ``bytearray``)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.log = precopy.DirtyLog(self.vm, mem, [])
        self.dest = bytearray(len(mem.ram))
        self._src, self._dst = socket.socketpair()
        self._errors: list[BaseException] = []
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender = precopy.Sender(self._src, mem.ram, lambda *_: None)

    def _receive(self) -> None:
        try:
            precopy.receive(self._dst, memoryview(self.dest), lambda _: None, lambda _: None)
        except BaseException as e:      # handed to the test by finish()
            self._errors.append(e)

    def first_pass(self) -> None:
        """Dirty logging on, and all of RAM sent as it is now."""
        self.log.start()
        self._receiver.start()
        self._sender.hello()
        self._sender.all_pages(lambda: None, None)

    def next_pass(self) -> None:
        """Collect what was written since the last pass and send it."""
        self._sender.pages(self.log.collect(), None)

    def finish(self) -> bytearray:
        """A last pass, the (empty) state record; the destination's RAM once it answered."""
        self.next_pass()
        self._sender.state(b"")
        self._receiver.join(10)
        if self._errors:
            raise self._errors[0]
        return self.dest

    def close(self) -> None:
        self.log.stop()
        self._src.close()
        self._dst.close()
        self.vm.close()
        self.kvm.close()
