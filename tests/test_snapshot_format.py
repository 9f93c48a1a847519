"""The snapshot files: what is written is read back whole; memory is sparse; a corrupt,
truncated, foreign or half-written snapshot is refused with one line naming what is wrong."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt.memory import GuestMemory, Region
from altovirt.snapshot import format as F

MiB = 1 << 20
SECTIONS = [F.Section("vcpu0", 1, b"\x01" * 100), F.Section("virtio-mmio@0xd0000000", 3, b"{}"),
            F.Section("empty", 1, b"")]


def ram(size: int = 16 * MiB) -> memoryview:
    """Mostly zero RAM with a few written pages, as a guest leaves it."""
    view = memoryview(mmap.mmap(-1, size))
    for at in range(0, size, 3 * MiB + 4096):
        view[at:at + 10] = b"guest page"
    view[size - 1:] = b"!"
    return view


def test_round_trip_and_sparse_memory(tmp_path: Path) -> None:
    memory = ram()
    snapshot_id = F.write(str(tmp_path), {"vcpus": 2}, SECTIONS, memory)
    header, sections = F.read_state(str(tmp_path))
    assert (header["vcpus"], header["id"], header["memory_size"]) == (2, snapshot_id, len(memory))
    assert list(sections.values()) == SECTIONS
    copy = memoryview(mmap.mmap(-1, len(memory)))
    F.read_memory(str(tmp_path), header, copy)
    assert copy == memory
    st_ = os.stat(tmp_path / "memory")
    assert st_.st_blocks * 512 < 64 * 4096            # 7 written pages, the rest holes
    assert sorted(os.listdir(tmp_path)) == ["memory", "state"]   # no temporary files left


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_corrupt_or_truncated_state_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                                   data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("snap")
    F.write(str(d), {"vcpus": 1}, SECTIONS, ram(1 * MiB))
    state = (d / "state").read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        bad = state[:data.draw(st.integers(0, len(state) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(state) - 1), label="at")
        bad = state[:at] + bytes([state[at] ^ data.draw(st.integers(1, 255), label="xor")]) + state[at + 1:]
    (d / "state").write_bytes(bad)
    with pytest.raises(F.SnapshotError) as e:
        F.read_state(str(d))
    assert str(e.value).startswith(f"{d / 'state'}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("change, problem", [
    (lambda state: state[:8] + (9).to_bytes(4, "little") + state[12:],
     "snapshot format 9; this AltoVirt reads 1"),
    (lambda state: b"#!/bin/sh\n" + state, "not an AltoVirt snapshot"),
    (lambda state: state + b"more", "4 bytes after the last section"),
])
def test_wrong_format_is_named(tmp_path: Path, change: Callable[[bytes], bytes], problem: str) -> None:
    F.write(str(tmp_path), {}, SECTIONS, ram(1 * MiB))
    state = tmp_path / "state"
    state.write_bytes(change(state.read_bytes()))
    with pytest.raises(F.SnapshotError, match=problem):
        F.read_state(str(tmp_path))


def test_memory_of_another_snapshot_is_refused(tmp_path: Path) -> None:
    """What a crash between the two renames leaves: the old state with the new memory."""
    first, second = tmp_path / "a", tmp_path / "b"
    F.write(str(first), {}, SECTIONS, ram(1 * MiB))
    F.write(str(second), {}, SECTIONS, ram(1 * MiB))
    os.replace(second / "memory", first / "memory")
    with pytest.raises(F.SnapshotError, match="memory: belongs to another snapshot"):
        F.read_state(str(first))
    os.truncate(second / "state", 0)
    with pytest.raises(F.SnapshotError, match="not an AltoVirt snapshot"):
        F.read_state(str(second))


def test_other_ram_size_and_missing_files(tmp_path: Path) -> None:
    F.write(str(tmp_path), {}, SECTIONS, ram(2 * MiB))
    header, _ = F.read_state(str(tmp_path))
    with pytest.raises(F.SnapshotError, match="2097152 bytes of RAM saved; this VM has 1048576"):
        F.read_memory(str(tmp_path), header, memoryview(mmap.mmap(-1, MiB)))
    os.unlink(tmp_path / "memory")
    with pytest.raises(F.SnapshotError, match="memory: No such file"):
        F.read_state(str(tmp_path))
    with pytest.raises(F.SnapshotError, match="nowhere/state: No such file"):
        F.read_state(str(tmp_path / "nowhere"))


def test_unwritable_place_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(F.SnapshotError, match="taken: File exists"):
        F.write(str(tmp_path / "taken"), {}, SECTIONS, ram(1 * MiB))
    assert (tmp_path / "taken").read_text() == "a file, not a directory"


def test_untouched_pages_are_skipped_not_lost(tmp_path: Path) -> None:
    """Guest RAM never touched is known to be zero without being read (pagemap); what the
    guest wrote, however little, is in the snapshot."""
    mem = GuestMemory([Region(0, 64 * MiB, 0)])
    try:
        mem.write(5 * MiB + 123, b"one write")
        mem.write(63 * MiB, b"\0")                   # touched, yet zero
        untouched = mem.untouched_pages()
        assert untouched is not None and len(untouched) == 64 * MiB // 4096
        assert untouched[(5 * MiB) // 4096] == 0 and untouched[(40 * MiB) // 4096] == 1
        F.write(str(tmp_path), {}, [], mem.ram, untouched=untouched)
        header, _ = F.read_state(str(tmp_path))
        copy = memoryview(mmap.mmap(-1, 64 * MiB))
        F.read_memory(str(tmp_path), header, copy)
        assert copy == mem.ram
    finally:
        mem.close()


def test_shared_ram_is_one_memfd_zeroed_and_loaded_in_place(tmp_path: Path) -> None:
    """Shared RAM (mem-share=on): what a back end maps through the memfd is what the VMM sees,
    a reset zeroes it there too, a snapshot's memory is read into it (not mapped over it), and
    nothing is taken as untouched (the back end writes through its own mapping)."""
    regions = [Region(0, 32 * MiB, 0), Region(4 << 30, 32 * MiB, 32 * MiB)]
    mem = GuestMemory(regions, shared=True)
    try:
        assert mem.fd is not None and mem.untouched_pages() is None
        backend = mmap.mmap(mem.fd, 64 * MiB)           # as a vhost-user back end maps it
        mem.write((4 << 30) + 7, b"guest data")
        assert backend[32 * MiB + 7:32 * MiB + 17] == b"guest data"
        backend[100:109] = b"from back"
        assert mem.read(100, 9) == b"from back"
        F.write(str(tmp_path), {}, [], mem.ram)
        mem.discard()
        assert backend[100:109] == bytes(9) and mem.read((4 << 30) + 7, 10) == bytes(10)
        fd = os.open(tmp_path / "memory", os.O_RDONLY)
        try:
            mem.map_file(fd)
        finally:
            os.close(fd)
        assert backend[32 * MiB + 7:32 * MiB + 17] == b"guest data" and mem.read(100, 9) == b"from back"
        backend.close()
    finally:
        mem.close()
