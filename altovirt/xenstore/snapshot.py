"""The whole XenStore as bytes, for snapshots and migration: :func:`save` and :func:`load`.

The image is versioned JSON in the envelope every saved state uses
(:mod:`altovirt.persist`): the tree, the guest's sessions (their watches
and open transactions) and the counters that must carry on (generation
counts, transaction ids). Host sessions are not saved: their clients belong
to the process that saved. A tree and the transactions' trees share nodes,
so every distinct node is written once, children before their parents, and
referred to by its index; loading keeps that sharing, which is what lets a
loaded transaction commit exactly when the saved one could have.

Version 1::

    {"format": "altovirt-xenstore", "version": 1, "guest_domid": N,
     "gen": last generation count, "next_tx": next transaction id,
     "nodes": [[value (base64), ["n0", ...], gen, {name: index}], ...],
     "root": index,
     "sessions": [{"watches": [[path, token], ...],
                   "transactions": [{"id": N, "base": index, "root": index,
                                     "changes": [[path, ["n0", ...], removed], ...]}]}]}
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..persist import SavedStateError, check, check_int, seal, unseal
from .store import DOM0, Change, Session, State, Store, Transaction, Watch, owners
from .tree import Node, Perm, XsError, check_path

FORMAT = "altovirt-xenstore"
VERSION = 1
TX_ID_MAX = 0xFFFFFFFF


# Data that is not a XenStore image this VMM can load; the store is unchanged.
SnapshotError = SavedStateError


def save(store: Store) -> bytes:
    with store.lock:
        guests = [s for s in store.sessions if s.domid != DOM0]
        roots = [store.state.root]
        for session in guests:
            for txn in session.transactions.values():
                roots += [txn.base, txn.state.root]
        nodes, index = _flatten(roots)
        image = {
            "guest_domid": store.guest_domid,
            "gen": store.gen, "next_tx": store.next_tx, "nodes": nodes, "root": index[id(store.state.root)],
            "sessions": [{
                "watches": [[w.path, w.token] for w in session.watches],
                "transactions": [{
                    "id": txn.id, "base": index[id(txn.base)], "root": index[id(txn.state.root)],
                    "changes": [[c.path, _perm_strings(c.perms), c.removed] for c in txn.changes],
                } for txn in session.transactions.values()],
            } for session in guests],
        }
    return seal(FORMAT, VERSION, image)


def load(store: Store, data: bytes) -> list[Session]:
    """Replace ``store``'s content with the image's (see :meth:`Store.restore`). Returns
    the guest's loaded sessions, which hold their events until :meth:`Session.attach`
    gives them a connection. A bad image raises SnapshotError and changes nothing."""
    image = unseal(data, FORMAT, VERSION, "a XenStore image")
    check(image.get("guest_domid") == store.guest_domid,
            f"the image's guest is domain {image.get('guest_domid')!r}; this VM's is {store.guest_domid}")
    gen = check_int(image.get("gen"), 0, 1 << 63, "gen")
    next_tx = check_int(image.get("next_tx"), 1, TX_ID_MAX, "next_tx")
    nodes = _nodes(_list(image.get("nodes"), "nodes"), gen)
    tx_ids: set[int] = set()
    guests = [_session(store, _dict(s, "a session"), nodes, tx_ids)
              for s in _list(image.get("sessions"), "sessions")]
    store.restore(_node_at(nodes, image.get("root")), gen, next_tx, guests)
    return guests


def _flatten(roots: list[Node]) -> tuple[list[list[Any]], dict[int, int]]:
    """Every distinct node under ``roots``, children first; and node id -> index."""
    out: list[list[Any]] = []
    index: dict[int, int] = {}
    for root in roots:
        stack = [(root, False)]
        while stack:                        # iterative: trees may be 1536 levels deep
            node, expanded = stack.pop()
            if id(node) in index:
                continue
            if not expanded:
                stack.append((node, True))
                stack += [(child, False) for child in node.children.values() if id(child) not in index]
                continue
            index[id(node)] = len(out)
            out.append([base64.b64encode(node.value).decode(), _perm_strings(node.perms), node.gen,
                        {name: index[id(child)] for name, child in node.children.items()}])
    return out, index


def _nodes(entries: list[Any], gen: int) -> list[Node]:
    nodes: list[Node] = []
    for i, entry in enumerate(entries):
        where = f"node {i}"
        check(isinstance(entry, list) and len(entry) == 4, f"{where} must be [value, perms, gen, children]")
        value, perms, node_gen, children = entry
        kids: dict[str, Node] = {}
        for name, j in _dict(children, f"{where}: children").items():
            check(_valid_name(name), f"{where}: {name!r} is not a node name")
            # Children come first: an index below this node's keeps the tree free of cycles.
            kids[name] = nodes[check_int(j, 0, i - 1, f"{where}: child {name!r}")]
        nodes.append(Node(_base64(value, where), _perms(perms, where), kids,
                          check_int(node_gen, 0, gen, f"{where}: gen")))
    return nodes


def _session(store: Store, image: dict[str, Any], nodes: list[Node], tx_ids: set[int]) -> Session:
    # Not one of the store's sessions until it is restored; it holds events until attached.
    session = Session(store, store.guest_domid)
    for w in _list(image.get("watches"), "a session's watches"):
        check(isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w),
                "a watch must be [path, token]")
        path, token = w
        absolute = _checked(path, session.home, watch=True)
        check(not any(o.absolute == absolute and o.token == token for o in session.watches),
                f"watch {path!r} {token!r} is there twice")
        session.watches.append(Watch(session, path, absolute, token))
    for t in _list(image.get("transactions"), "a session's transactions"):
        t = _dict(t, "a transaction")
        tx = check_int(t.get("id"), 1, TX_ID_MAX, "a transaction's id")
        check(tx not in tx_ids, f"transaction {tx} is there twice")
        tx_ids.add(tx)
        root = _node_at(nodes, t.get("root"))
        changes = [_change(c, tx) for c in _list(t.get("changes"), f"transaction {tx}: changes")]
        session.transactions[tx] = Transaction(tx, _node_at(nodes, t.get("base")), State(root, owners(root)),
                                               changes)
    return session


def _change(c: object, tx: int) -> Change:
    c = _list(c, f"transaction {tx}: a change")
    check(len(c) == 3 and isinstance(c[0], str) and isinstance(c[2], bool),
            f"transaction {tx}: a change must be [path, perms, removed]")
    path, perms, removed = c
    return Change(_checked(path, "/"), _perms(perms, f"transaction {tx}"), removed)


def _node_at(nodes: list[Node], index: object) -> Node:
    return nodes[check_int(index, 0, len(nodes) - 1, "a node index")]


def _perms(texts: object, where: str) -> tuple[Perm, ...]:
    texts = _list(texts, f"{where}: perms")
    check(len(texts) > 0 and all(isinstance(t, str) for t in texts),
            f"{where}: perms must be a non-empty list of strings")
    try:
        return tuple(Perm.parse(t) for t in texts)
    except XsError as e:
        raise SnapshotError(f"{where}: perms {texts!r} are not Xen's (n0, r7...)") from e


def _perm_strings(perms: tuple[Perm, ...]) -> list[str]:
    return [str(p) for p in perms]


def _checked(path: str, home: str, *, watch: bool = False) -> str:
    try:
        return check_path(path, home, watch=watch)
    except XsError as e:
        raise SnapshotError(f"{path!r} is not a XenStore path") from e


def _valid_name(name: str) -> bool:
    try:
        return bool(name) and "/" not in name and check_path(f"/{name}", "/") == f"/{name}"
    except XsError:
        return False


def _base64(value: object, where: str) -> bytes:
    try:
        if isinstance(value, str):
            return base64.b64decode(value, validate=True)
    except binascii.Error:
        pass
    raise SnapshotError(f"{where}: the value must be base64")


def _list(x: object, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise SnapshotError(f"{what} must be a list")
    return x


def _dict(x: object, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise SnapshotError(f"{what} must be an object")
    return x


