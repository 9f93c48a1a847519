"""Snapshots and migrations on the VM's main thread: save a stopped VM's state, load one
into a VM waiting in inmigrate, stop for a live migration's last copy and end it, and make a
VM just built from a snapshot's configuration the VM the snapshot holds (Firecracker's
snapshot/load). The sections themselves are :mod:`.sections`'. Imported only when a VM is
saved or restored.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ..snapshot import format as snapfile
from ..snapshot.format import Section, SnapshotError
from .lifecycle import RunState, StateError
from .sections import VmState, check_memory_size, parse, restore, save, saved_config

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..memory import GuestMemory
    from .machine import Machine

log = logging.getLogger(__name__)


class SavedVm(NamedTuple):
    """A VM to build from a snapshot (Firecracker's snapshot/load): its state, read and
    checked, and the files its memory comes from (mapped copy-on-write)."""

    state: VmState
    files: snapfile.SnapshotFiles | None    # None: the RAM is the saved VM's already (a fork's)
    resume: bool                    # run once built, instead of waiting paused


def read(where: snapfile.SnapshotFiles) -> tuple[VmConfig, VmState]:
    """The configuration and state a snapshot's files hold; SnapshotError if they cannot be
    read or do not hold a whole VM."""
    header, sections = snapfile.read_state(where)
    return saved_config(sections), parse(header, sections)


def load_memory(mem: GuestMemory, where: snapfile.SnapshotFiles, header: dict[str, Any], *,
                mapped: bool) -> None:
    """Put a snapshot's memory in place of ``mem``'s: mapped copy-on-write, or read in."""
    check_memory_size(header, mem.size)     # before a byte of it is read
    if mapped:
        fd = snapfile.open_memory(where)
        try:
            mem.map_file(fd)
        except OSError as e:
            raise SnapshotError(f"{where.memory}: {e.strerror or e}") from e
        finally:
            os.close(fd)
    else:
        mem.discard()                   # zero: the file's holes are not read
        snapfile.read_memory(where, header, mem.ram)


def build_from(m: Machine, saved: SavedVm) -> None:
    """Make ``m``, just built from the snapshot's configuration, the VM the snapshot holds:
    its memory and state in, paused, with a new VM generation ID (it may be one of several
    clones). SnapshotError if they do not fit; ``m`` must then not run."""
    m.expect_incoming()
    # Each vCPU enters KVM_RUN once first (immediate_exit: it returns at once, running
    # nothing), as -incoming's parked vCPU threads have by the time their state comes.
    # Measured on this host's KVM (PVM): a probe whose state went into vCPUs that had never
    # entered KVM_RUN never woke again once resumed; after one entry, before or after the
    # restore, it runs on (the registers, LAPIC and MSRs read back the same either way).
    for v in m.vcpus:
        v.vcpu.enter_once()
    if saved.files is not None:
        load_memory(m.mem, saved.files, saved.state.header, mapped=True)
    load_state(m, saved.state, resume=False, new_generation=True)
    if saved.files is None and m.vsock is not None:
        m.vsock.connections_lost()      # a fork's: its parent kept them (vmm/fork.py)


def save_state(m: Machine) -> tuple[dict[str, Any], list[Section]]:
    """The stopped VM's header and sections (the main thread). SaveError if a device cannot be
    saved now; StateError unless stopped."""
    with m.lifecycle.lock:
        m.lifecycle.require(RunState.PAUSED, RunState.FINISH_MIGRATE)
        assert m.clock is not None
        start = time.monotonic()
        saved = save(m, m.snapshot_msrs(), m.clock)
        m.state_seconds = time.monotonic() - start
        return saved


def load_state(m: Machine, state: VmState, *, resume: bool, new_generation: bool) -> None:
    """Take a snapshot's state (the main thread); paused after, or running if ``resume`` (or a
    'cont' came while it loaded). ``new_generation``: a VM started again from a snapshot
    (perhaps one of several clones) gets a new VM generation ID; a migrated one keeps its own.
    SnapshotError naming the section and the reason if it does not fit this VM."""
    with m.lifecycle.lock:
        m.lifecycle.require(RunState.INMIGRATE)
        start = time.monotonic()
        m.clock = restore(m, state)
        m.state_seconds = time.monotonic() - start
        try:
            m.take_images()
        except StateError as e:
            raise SnapshotError(str(e)) from e
        if m.vmgenid is not None and new_generation:
            m.vmgenid.change()
        elif m.vmgenid is not None:
            m.vmgenid.taken_from_ram()
        m.lifecycle.move(RunState.PAUSED)
        m.lost_ticks.discard()
        m.devices.announce_nics()       # sent once device work runs
    if resume or m.run_once_loaded:
        m.resume()


def stop_for_migration(m: Machine) -> RunState:
    """Stop the guest for a live migration's last copy (finish-migrate) and let the destination
    lock the disk images (the main thread); the state to go back to if it fails."""
    life = m.lifecycle
    with life.lock:
        life.require(RunState.RUNNING, RunState.PAUSED)
        was = life.state
        if was == RunState.RUNNING:
            m.stop_guest()
        life.move(RunState.FINISH_MIGRATE)
        if m.hotplug is not None:
            m.hotplug.release_images()
    if was == RunState.RUNNING:
        life.emit("STOP", {})
    return was


def end_migration(m: Machine, completed: bool, was: RunState) -> None:
    """After the last copy (the main thread): postmigrate if the destination took the VM, else
    back to ``was``, the images locked again."""
    life = m.lifecycle
    with life.lock:
        if life.state != RunState.FINISH_MIGRATE:
            return                  # stopped meanwhile
        if completed:
            life.move(RunState.POSTMIGRATE)
            return
        try:
            m.take_images()
        except StateError as e:
            log.error("after a failed migration: %s", e)
        if was == RunState.RUNNING:
            m.start_guest()
        life.move(was)
    if was == RunState.RUNNING:
        life.emit("RESUME", {})
