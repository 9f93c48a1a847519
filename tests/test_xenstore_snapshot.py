"""Saving and loading the whole XenStore: a round trip keeps the tree, permissions,
generation counts, the guest's watches and open transactions; after a load the host's
watches fire and the guest's do not; a bad image changes nothing."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altovirt.xenstore.snapshot import SnapshotError, load, save
from altovirt.xenstore.store import Session, Store, owners
from altovirt.xenstore.tree import Perm, XsError

GUEST = 7
PATHS = ("a", "a/b", "a/b/c", "d", "/vm", "/vm/x", "/vm/x/y", "/local/domain/7/e", "/local/domain/8/f")
PERMS = (("n0",), ("n7",), ("n0", "r7"), ("n7", "b8"), ("r7", "w0"))

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.sampled_from(PATHS), st.binary(max_size=8)),
    st.tuples(st.just("rm"), st.integers(0, 2), st.sampled_from(PATHS)),
    st.tuples(st.just("perms"), st.integers(0, 2), st.sampled_from(PATHS), st.sampled_from(PERMS)),
    st.tuples(st.just("watch"), st.integers(0, 2), st.sampled_from((*PATHS, "/", "@releaseDomain")),
              st.sampled_from(("t", "u\xff"))),
    st.tuples(st.just("start"), st.integers(0, 2)),
    st.tuples(st.just("in-tx"), st.integers(0, 2), st.sampled_from(PATHS), st.binary(max_size=8)),
    st.tuples(st.just("end"), st.integers(0, 2), st.booleans()),
), max_size=40)


def build(script: list[tuple[Any, ...]]) -> tuple[Store, list[Session]]:
    """A store after ``script``, run by the host (0) and two guest connections (1, 2)."""
    store = Store(GUEST)
    sessions = [store.session(0, lambda p, t: None)] + [store.session(GUEST, lambda p, t: None) for _ in "12"]
    for op, who, *args in script:
        s = sessions[who]
        open_tx = list(s.transactions)
        try:
            if op == "write":
                s.write(0, *args)
            elif op == "rm":
                s.rm(0, *args)
            elif op == "perms":
                s.set_perms(0, args[0], tuple(Perm.parse(p) for p in args[1]))
            elif op == "watch":
                s.watch(*args)
            elif op == "start":
                s.transaction_start()
            elif op == "in-tx" and open_tx:
                s.write(open_tx[-1], *args)
            elif op == "end" and open_tx:
                s.transaction_end(open_tx[0], *args)
        except XsError:
            pass
    return store, sessions[1:]


def tree(store: Store) -> list[tuple[str, bytes, str, int]]:
    nodes = store.state.root.walk("/")
    return sorted((path, n.value, ",".join(map(str, n.perms)), n.gen) for path, n in nodes)


def commit_all(guests: list[Session]) -> list[str]:
    """Commit every open transaction, oldest first: what each commit answered."""
    results = []
    for s in guests:
        for tx in sorted(s.transactions):
            try:
                s.transaction_end(tx, True)
                results.append("OK")
            except XsError as e:
                results.append(e.name)
    return results


@settings(max_examples=200, deadline=None)
@given(ops)
def test_round_trip(script: list[tuple[object, ...]]) -> None:
    original, guests = build(script)
    assert {d: n for d, n in original.state.owned.items() if n} == owners(original.state.root)
    image = save(original)
    copy = Store(GUEST)
    host_events: list[tuple[str, str]] = []
    host = copy.session(0, lambda p, t: host_events.append((p, t)))
    host.watch("/vm", "h")
    host.watch("@introduceDomain", "h")
    loaded = load(copy, image)
    assert save(copy) == image                                    # nothing lost, nothing added
    assert tree(copy) == tree(original)
    assert copy.state.owned == owners(original.state.root)
    assert host_events == [("/vm", "h")]                        # the host hears the tree changed
    assert [[(w.path, w.token) for w in s.watches] for s in loaded] == \
        [[(w.path, w.token) for w in s.watches] for s in guests]
    assert all(s.held == [] for s in loaded)                    # no initial events for the guest
    # From here both stores must behave alike: the same answers, the same events.
    heard: dict[Session, list[tuple[str, str]]] = {s: [] for s in guests + loaded}

    def record(sink: list[tuple[str, str]], path: str, token: str) -> None:
        sink.append((path, token))

    for s, sink in heard.items():
        s.attach(functools.partial(record, sink))
    assert commit_all(loaded) == commit_all(guests)            # commit or conflict, as saved
    for store in (original, copy):
        store.session(0, lambda p, t: None).write(0, "/local/domain/7/a/z", b"")
    assert tree(copy) == tree(original)
    assert [heard[s] for s in loaded] == [heard[s] for s in guests]


def test_a_loaded_transaction_keeps_its_base() -> None:
    """A transaction open at the save commits after the load unless the tree changes."""
    store = Store(GUEST)
    guest = store.session(GUEST, lambda p, t: None)
    tx = guest.transaction_start()
    guest.write(tx, "k", b"v")
    for changed in (False, True):
        copy = Store(GUEST)
        (loaded,) = load(copy, save(store))
        if changed:
            copy.session(0, lambda p, t: None).write(0, "/other", b"")
        if changed:
            with pytest.raises(XsError, match="EAGAIN"):
                loaded.transaction_end(tx, True)
        else:
            loaded.transaction_end(tx, True)
            assert loaded.read(0, "k") == b"v"


def test_the_guest_reconnecting_takes_up_its_sessions() -> None:
    """A snapshot closes the guest's connections; its next ones get its sessions back, with
    their watches and the events raised meanwhile; after those, connections start afresh."""
    store = Store(GUEST)
    first = store.session(GUEST, lambda p, t: None)
    first.watch("a", "t1")
    store.session(GUEST, lambda p, t: None).watch("b", "t2")
    copy = Store(GUEST)
    load(copy, save(store))
    copy.session(0, lambda p, t: None).write(0, "/local/domain/7/a", b"changed while away")
    heard: list[tuple[str, str]] = []
    again = copy.session(GUEST, lambda p, t: heard.append((p, t)))
    assert [(w.path, w.token) for w in again.watches] == [("a", "t1")]
    assert heard == [("a", "t1")]                                # held, then delivered
    assert [(w.path, w.token) for w in copy.session(GUEST, lambda p, t: None).watches] == [("b", "t2")]
    assert copy.session(GUEST, lambda p, t: None).watches == []


def test_guest_sessions_open_at_load_are_reset() -> None:
    copy = Store(GUEST)
    live = copy.session(GUEST, lambda p, t: None)
    live.watch("a", "t")
    live.transaction_start()
    load(copy, save(Store(GUEST)))
    assert live.watches == [] and live.transactions == {} and copy.watches == []
    for _ in range(10):
        live.transaction_start()                                 # its quota is free again


def _image(**changes: object) -> bytes:
    store = Store(GUEST)
    guest = store.session(GUEST, lambda p, t: None)
    guest.write(0, "k", b"v")
    guest.watch("k", "t")
    guest.transaction_start()
    image = json.loads(save(store))
    for key, value in changes.items():
        image[key] = value
    return json.dumps(image).encode()


@pytest.mark.parametrize("data, problem", [
    (b"", "not a XenStore image"),
    (b"[" * 100000, "not a XenStore image"),
    (b"\xff\xfe", "not a XenStore image"),
    (b'{"format": "qemu"}', "not a XenStore image"),
    (_image(version=2), "version 2; this VMM reads version 1"),
    (_image(guest_domid=8), "guest is domain 8; this VM's is 7"),
    (_image(gen=-1), "gen must be an integer"),
    (_image(next_tx=0), "next_tx must be an integer"),
    (_image(root=True), "a node index must be an integer"),
    (_image(root=10 ** 6), "a node index must be an integer"),
    (_image(nodes=[["!", ["n0"], 0, {}]]), "node 0: the value must be base64"),
    (_image(nodes=[["", [], 0, {}]]), "node 0: perms must be a non-empty list"),
    (_image(nodes=[["", ["q0"], 0, {}]]), "are not Xen's"),
    (_image(nodes=[["", ["n0"], 0, {"a": 0}]]), "node 0: child 'a' must be an integer from 0 to -1"),
    (_image(nodes=[["", ["n0"], 0, {}], ["", ["n0"], 0, {"a/b": 0}]]), "'a/b' is not a node name"),
    (_image(nodes=[["", ["n0"], 0, {}], ["", ["n0"], 0, {"": 0}]]), "'' is not a node name"),
    (_image(sessions={}), "sessions must be a list"),
    (_image(sessions=[{"watches": [["bad//path", "t"]], "transactions": []}]), "is not a XenStore path"),
    (_image(sessions=[{"watches": [["a", "t"], ["a", "t"]], "transactions": []}]), "is there twice"),
    (_image(sessions=[{"watches": [], "transactions": [{"id": 1, "base": 0, "root": 0, "changes": []}] * 2}]),
     "transaction 1 is there twice"),
    (_image(sessions=[{"watches": [], "transactions": [{"id": 1, "base": 0, "root": 0,
                                                        "changes": [["/a", ["n0"], "yes"]]}]}]),
     "a change must be [path, perms, removed]"),
])
def test_bad_images_change_nothing(data: bytes, problem: str) -> None:
    store = Store(GUEST)
    host = store.session(0, lambda p, t: None)
    host.write(0, "/keep", b"me")
    before = save(store)
    with pytest.raises(SnapshotError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load(store, data)
    assert save(store) == before
