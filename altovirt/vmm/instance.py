"""A Firecracker-style microVM process: configured through its API, then started or
loaded from a snapshot, once.

Before the start, the API thread edits the :class:`FirecrackerConfig` under
the instance's lock. ``InstanceStart`` and ``snapshot/load`` become a
:class:`Launch` handed to the main thread (:meth:`Instance.next_launch`),
which builds and runs the VM; the API's answer waits until the vCPUs run
(or the snapshot is in), or carries the reason the VM could not be built,
and then the instance is back to being configured. After the start the API
asks the :class:`Machine` for what it wants, as QMP does.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..config.firecracker import FirecrackerConfig, FirecrackerError
from ..config.model import VmConfig
from ..errors import AltoVirtError
from .lifecycle import RunState
from .machine import Machine

if TYPE_CHECKING:
    from .snapshot import SavedVm

T = TypeVar("T")
NOT_STARTED = "Not started"
PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
POST_BOOT_ONLY = "The requested operation is not supported before starting the microVM."


@dataclass(eq=False)
class Launch:
    """A VM for the main thread to build and run, and the API thread waiting to hear how it went."""

    cfg: VmConfig
    saved: SavedVm | None = None        # snapshot/load: the VM is built from this snapshot
    error: AltoVirtError | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def restore(self) -> bool:
        return self.saved is not None

    @property
    def answered(self) -> bool:
        return self._done.is_set()

    def running(self) -> None:
        """The VM runs (or, restored, holds its snapshot's state): the API answers 204."""
        self._done.set()

    def failed(self, error: AltoVirtError) -> None:
        self.error = error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class Instance:
    """The microVM of one ``altovirt-firecracker`` process."""

    def __init__(self, instance_id: str, config: FirecrackerConfig | None = None) -> None:
        self.id = instance_id
        self.config = config or FirecrackerConfig()
        self.machine: Machine | None = None
        self.restored = False                   # loaded from a snapshot (no boot source to show)
        self._lock = threading.Lock()
        self._launching = False
        self._launches: queue.SimpleQueue[Launch | None] = queue.SimpleQueue()

    # --- the API thread ---
    @property
    def state(self) -> str:
        """Firecracker's InstanceInfo.state: Not started, Running or Paused."""
        m = self.machine
        if m is None:
            return NOT_STARTED
        return "Running" if m.state in (RunState.RUNNING, RunState.SHUTDOWN) else "Paused"

    def configure(self, change: Callable[[FirecrackerConfig], T]) -> T:
        """Apply ``change`` to the configuration; pre-boot only."""
        with self._lock:
            if self._launching or self.machine is not None:
                raise FirecrackerError(PRE_BOOT_ONLY)
            return change(self.config)

    def running(self) -> Machine:
        """The VM, for a post-boot request; FirecrackerError before the start."""
        m = self.machine
        if m is None:
            raise FirecrackerError(POST_BOOT_ONLY)
        return m

    def launch(self, make: Callable[[FirecrackerConfig], Launch]) -> None:
        """Have the main thread build the VM ``make`` describes and run it; returns once it
        runs (or, restored, holds its snapshot's state), or raises why it could not be built
        (the instance is then as it was)."""
        with self._lock:
            if self._launching or self.machine is not None:
                raise FirecrackerError(PRE_BOOT_ONLY)
            before = copy.deepcopy(self.config)
            launch = make(self.config)
            self._launching = True
        self._launches.put(launch)
        try:
            launch.wait()
        except BaseException:
            with self._lock:
                self.config = before
            raise
        finally:
            with self._lock:
                self._launching = False

    # --- the main thread ---
    def next_launch(self) -> Launch | None:
        """The next launch the API asked for (None: stop waiting)."""
        return self._launches.get()

    def built(self, machine: Machine, restore: bool) -> None:
        self.machine = machine
        self.restored = restore

    def stop_waiting(self) -> None:
        """Wake :meth:`next_launch` with None (a signal before any launch)."""
        self._launches.put(None)
