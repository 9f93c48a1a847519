"""tests/linux/test_snapshot.py on arm64, in its file order, sharing its boot: a busy Debian
guest saved, restored (with, here, both vCPUs taking their timer interrupts through the
restored GIC and redistributors), migrated live while it rewrites 64 MiB, cloned three
times and forked (vm-fork) while it runs; every vCPU register KVM lists, the GIC, the PL011,
PL031 and PL061 carried each time."""

from __future__ import annotations

from ..linux import test_snapshot as shared
from ..linux.test_snapshot import Bed, bed

__all__ = ["bed"]
pytestmark = shared.pytestmark

test_snapshot_of_a_busy_guest = shared.test_snapshot_of_a_busy_guest
test_restored_guest_carries_on = shared.test_restored_guest_carries_on


def test_restored_vcpus_take_their_timer_interrupts(bed: Bed) -> None:
    """Each vCPU's architected timer interrupts (a PPI, its redistributor's) go on counting."""
    r = next(r for r in bed.runs if r.name == "restored")

    def counts() -> list[int]:
        return [int(n) for n in r.g.check("grep arch_timer /proc/interrupts").split()[1:3]]

    before = counts()
    r.g.check("sleep 2")
    after = counts()
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


test_live_migration_of_a_guest_writing_memory = shared.test_live_migration_of_a_guest_writing_memory
test_three_clones_side_by_side = shared.test_three_clones_side_by_side
test_forks_of_a_running_guest = shared.test_forks_of_a_running_guest
