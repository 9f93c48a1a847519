"""The XenStore's semantics, on the store itself: paths, permissions, watches, transactions
and quotas (the behaviours of Xen's docs/misc/xenstore.txt and QEMU's test-xs-node.c)."""

from __future__ import annotations

import pytest

from altovirt.xenstore.store import Quota, Session, Store
from altovirt.xenstore.tree import Perm, XsError

GUEST = 5


def perms(*text: str) -> tuple[Perm, ...]:
    return tuple(Perm.parse(t) for t in text)


class Client:
    """A session that records the watch events it is sent."""

    def __init__(self, store: Store, domid: int) -> None:
        self.events: list[tuple[str, str]] = []
        self.s: Session = store.session(domid, lambda path, token: self.events.append((path, token)))

    def watch(self, path: str, token: str) -> None:
        self.s.fire_initial(self.s.watch(path, token))

    def take(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


def errno_of(call: object, *args: object) -> str:
    with pytest.raises(XsError) as e:
        call(*args)                                              # type: ignore[operator]
    return e.value.name


@pytest.fixture
def store() -> Store:
    return Store(GUEST)


@pytest.fixture
def host(store: Store) -> Client:
    return Client(store, 0)


@pytest.fixture
def guest(store: Store) -> Client:
    return Client(store, GUEST)


def test_start_up_tree(host: Client) -> None:
    s = host.s
    assert s.directory(0, "/")[1] == ["local"]
    assert s.directory(0, "/local/domain")[1] == [str(GUEST)]
    assert s.get_perms(0, f"/local/domain/{GUEST}") == perms(f"n{GUEST}")
    assert s.get_perms(0, "/local") == perms("n0")


def test_write_creates_parents_and_directory_is_sorted(host: Client) -> None:
    s = host.s
    for name in ("zeta", "alpha", "mid-dle", "B_2"):
        s.write(0, f"/data/{name}/leaf", name.encode())
    gen, names = s.directory(0, "/data")
    assert names == ["B_2", "alpha", "mid-dle", "zeta"]
    assert s.read(0, "/data/alpha") == b""                    # an implicit parent: empty
    assert s.read(0, "/data/alpha/leaf") == b"alpha"
    s.write(0, "/data/new", b"")
    assert s.directory(0, "/data")[0] != gen                  # the generation count moves
    assert errno_of(s.read, 0, "/data/nope") == "ENOENT"
    s.mkdir(0, "/data/alpha")                                 # exists: OK, value kept
    assert s.read(0, "/data/alpha/leaf") == b"alpha"


@pytest.mark.parametrize("path", ["", "/a//b", "/a/", "/a b", "/a/é", "/@x", "/" + "a" * 3072, "a" * 2049])
def test_invalid_paths(host: Client, path: str) -> None:
    assert errno_of(host.s.write, 0, path, b"v") == "EINVAL"


def test_deepest_path(host: Client) -> None:
    """A path at the length limit is 1536 names deep: past Python's recursion limit."""
    deep = "/d" * 1536
    host.s.write(0, deep, b"bottom")
    assert host.s.read(0, deep) == b"bottom"
    host.watch(deep, "t")
    host.take()
    host.s.rm(0, "/d")
    assert host.take() == [(deep, "t")]
    assert errno_of(host.s.write, 0, deep + "/d", b"") == "EINVAL"


def test_rm(host: Client) -> None:
    s = host.s
    s.write(0, "/a/b/c", b"1")
    s.rm(0, "/a/b/missing")                       # parent exists: OK
    assert errno_of(s.rm, 0, "/a/x/y") == "ENOENT"
    assert errno_of(s.rm, 0, "/") == "EINVAL"
    s.rm(0, "/a")
    assert errno_of(s.read, 0, "/a/b/c") == "ENOENT"


def test_guest_permissions(host: Client, guest: Client) -> None:
    h, g = host.s, guest.s
    # Outside its home the guest may do nothing (the tree's root is n0).
    h.write(0, "/vm/config", b"secret")
    assert errno_of(g.read, 0, "/vm/config") == "EACCES"
    assert errno_of(g.write, 0, "/vm/mine", b"x") == "EACCES"
    assert errno_of(g.write, 0, "/elsewhere", b"x") == "EACCES"
    # Relative paths are under its home, which it owns; it owns what it creates there.
    g.write(0, "data/x", b"1")
    assert h.read(0, f"/local/domain/{GUEST}/data/x") == b"1"
    assert h.get_perms(0, f"/local/domain/{GUEST}/data/x") == perms(f"n{GUEST}")
    # Entries after the first override it per domain; the last match wins.
    h.set_perms(0, "/vm/config", perms("n0", f"r{GUEST}"))
    assert g.read(0, "/vm/config") == b"secret"
    assert errno_of(g.write, 0, "/vm/config", b"no") == "EACCES"
    h.set_perms(0, "/vm/config", perms("r0", f"b{GUEST}", f"n{GUEST}"))
    assert errno_of(g.read, 0, "/vm/config") == "EACCES"
    h.set_perms(0, "/vm/config", perms("b0"))                 # the default for everyone else
    g.write(0, "/vm/config", b"ok")
    # Children inherit the parent's list; a guest's new node names the guest as owner.
    h.set_perms(0, "/vm", perms("n0", f"w{GUEST}"))
    g.write(0, "/vm/child", b"c")
    assert h.get_perms(0, "/vm/child") == perms(f"n{GUEST}", f"w{GUEST}")
    h.write(0, "/vm/hostchild", b"h")
    assert h.get_perms(0, "/vm/hostchild") == perms("n0", f"w{GUEST}")


def test_set_perms_rules(host: Client, guest: Client) -> None:
    h, g = host.s, guest.s
    h.write(0, "/shared", b"")
    h.set_perms(0, "/shared", perms("n0", f"b{GUEST}"))
    assert errno_of(g.set_perms, 0, "/shared", perms(f"n{GUEST}")) == "EACCES"     # not the owner
    g.write(0, "mine", b"")
    assert errno_of(g.set_perms, 0, "mine", perms("n0")) == "EACCES"             # giving it away
    six = perms(f"n{GUEST}", "r1", "r2", "r3", "r4", "r6")
    assert errno_of(g.set_perms, 0, "mine", six) == "ENOSPC"
    g.set_perms(0, "mine", six[:5])
    h.set_perms(0, "/shared", (*six, Perm("r", 7)))                              # dom0: no limit
    assert errno_of(Perm.parse, "x5") == "EINVAL"
    assert errno_of(Perm.parse, "r") == "EINVAL"


def test_watches_fire_on_node_and_below(host: Client) -> None:
    h = host.s
    host.watch("/a", "tok")
    assert host.take() == [("/a", "tok")]                     # the initial event
    h.write(0, "/a/b/c", b"1")
    h.write(0, "/ab", b"not below /a")
    h.set_perms(0, "/a/b", perms("r0"))
    h.rm(0, "/a")
    assert host.take() == [("/a/b/c", "tok"), ("/a/b", "tok"), ("/a", "tok")]
    assert errno_of(h.watch, "/a", "tok") == "EEXIST"
    h.watch("/a", "other")                                     # another token is another watch
    h.unwatch("/a", "tok")
    assert errno_of(h.unwatch, "/a", "tok") == "ENOENT"
    host.take()
    h.reset()
    h.write(0, "/a", b"")
    assert host.take() == []


def test_relative_watch_gets_relative_events(guest: Client) -> None:
    guest.watch("device", "t")
    guest.s.write(0, "device/vif/0", b"up")
    assert guest.take() == [("device", "t"), ("device/vif/0", "t")]


def test_removing_a_subtree_tells_watches_below_it(host: Client) -> None:
    h = host.s
    h.write(0, "/x/y/z", b"")
    host.watch("/x/y/z", "deep")
    host.watch("/x/y/never", "absent")
    host.take()
    h.rm(0, "/x")
    assert sorted(host.take()) == [("/x/y/never", "absent"), ("/x/y/z", "deep")]


def test_guests_hear_only_of_what_they_may_read(host: Client, guest: Client) -> None:
    host.s.write(0, "/pub", b"")
    host.s.set_perms(0, "/pub", perms("r0"))
    host.s.write(0, "/pub/open", b"")                        # inherits r0
    guest.watch("/pub", "g")
    assert guest.take() == [("/pub", "g")]
    host.s.write(0, "/pub/hidden", b"")
    host.s.set_perms(0, "/pub/hidden", perms("n0"))
    host.s.write(0, "/pub/hidden", b"again")
    host.s.write(0, "/pub/open", b"seen")
    assert guest.take() == [("/pub/hidden", "g"), ("/pub/open", "g")]   # the first while still r0


def test_transaction_isolation_commit_and_events(host: Client) -> None:
    other = Client(host.s.store, 0)
    h = host.s
    h.write(0, "/t/base", b"0")
    other.watch("/t", "w")
    other.take()
    tx = h.transaction_start()
    h.write(tx, "/t/new", b"1")
    assert h.read(tx, "/t/new") == b"1"                        # its own writes
    assert errno_of(h.read, 0, "/t/new") == "ENOENT"          # nobody else's view
    assert other.take() == []                                  # no events before commit
    h.transaction_end(tx, True)
    assert h.read(0, "/t/new") == b"1"
    assert other.take() == [("/t/new", "w")]
    assert errno_of(h.transaction_end, tx, True) == "ENOENT"   # gone
    assert errno_of(h.read, 99, "/t") == "ENOENT"              # unknown transaction


def test_abort_and_conflict(host: Client) -> None:
    other = Client(host.s.store, 0)
    h, o = host.s, other.s
    host.watch("/c", "w")
    host.take()
    tx = h.transaction_start()
    h.write(tx, "/c/x", b"1")
    h.transaction_end(tx, False)
    assert errno_of(h.read, 0, "/c/x") == "ENOENT" and host.take() == []
    tx = h.transaction_start()
    h.write(tx, "/c/x", b"mine")
    o.write(0, "/unrelated", b"")                              # QEMU: any change conflicts
    assert errno_of(h.transaction_end, tx, True) == "EAGAIN"
    assert errno_of(h.read, 0, "/c/x") == "ENOENT"
    tx = h.transaction_start()                                 # the retry
    h.write(tx, "/c/x", b"mine")
    h.transaction_end(tx, True)
    assert h.read(0, "/c/x") == b"mine"


def test_node_removed_and_recreated_in_one_transaction(host: Client) -> None:
    h = host.s
    h.write(0, "/r/child/grandchild", b"old")
    tx = h.transaction_start()
    h.rm(tx, "/r")
    assert errno_of(h.read, tx, "/r/child") == "ENOENT"
    h.write(tx, "/r/child", b"new")
    assert h.directory(tx, "/r/child")[1] == []
    h.transaction_end(tx, True)
    assert h.read(0, "/r/child") == b"new"
    assert errno_of(h.read, 0, "/r/child/grandchild") == "ENOENT"


def test_quotas(store: Store, guest: Client) -> None:
    small = Store(GUEST, Quota(nodes=10))
    g = Client(small, GUEST).s
    for i in range(9):                                         # its home counts as one
        g.write(0, f"n{i}", b"")
    assert errno_of(g.write, 0, "n9", b"") == "ENOSPC"
    assert errno_of(g.write, 0, "n0/deeper/two", b"") == "ENOSPC"      # both new nodes count
    g.rm(0, "n0")
    tx = g.transaction_start()
    g.write(tx, "n0", b"")
    assert errno_of(g.write, tx, "n10", b"") == "ENOSPC"       # counted inside transactions too
    g.transaction_end(tx, True)
    # The default quotas.
    s = guest.s
    assert errno_of(s.write, 0, "big", b"x" * 2049) == "ENOSPC"
    s.write(0, "big", b"x" * 2048)
    for i in range(128):
        s.watch(f"w{i}", "t")
    assert errno_of(s.watch, "w128", "t") == "E2BIG"
    txs = [s.transaction_start() for _ in range(10)]
    assert errno_of(s.transaction_start) == "ENOSPC"
    s.transaction_end(txs[0], False)
    s.transaction_start()
    host = store.session(0, lambda p, t: None)
    for _ in range(20):
        host.transaction_start()                               # dom0 has no quota


def test_watch_and_transaction_quotas_are_the_domains(store: Store, guest: Client) -> None:
    """A guest may open several connections (vsock); they share its quotas, and closing
    one gives back what it held."""
    second = Client(store, GUEST).s
    for i in range(100):
        guest.s.watch(f"w{i}", "t")
    for i in range(28):
        second.watch(f"x{i}", "t")
    assert errno_of(second.watch, "x28", "t") == "E2BIG"
    for _ in range(6):
        guest.s.transaction_start()
    for _ in range(4):
        second.transaction_start()
    assert errno_of(second.transaction_start) == "ENOSPC"
    guest.s.close()
    second.watch("x28", "t")
    second.transaction_start()


def test_guest_node_count_at_the_default_quota(guest: Client) -> None:
    s = guest.s
    for i in range(999):
        s.write(0, f"k{i}", b"")
    assert errno_of(s.write, 0, "one-too-many", b"") == "ENOSPC"
