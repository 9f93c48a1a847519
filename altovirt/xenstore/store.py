"""The XenStore: a tree of nodes with permissions, watches, transactions and guest quotas.

One :class:`Store` per VM holds the tree; every client (a host socket
connection, the guest's vsock connection, QMP) talks to it through a
:class:`Session` that carries its domain id, its watches and its
transactions. dom0 (the host) is privileged; a guest domain is held to its
permissions and to the quotas. The semantics are xenstored's, and QEMU's where
they differ (a transaction fails with EAGAIN if anything changed the tree
meanwhile). Errors are :class:`XsError` with the protocol's errno name.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .tree import Node, Perm, Perms, XsError, can, check_path, split

DOM0 = 0


@dataclass(frozen=True)
class Quota:
    """Limits on an unprivileged domain (xenstored's defaults)."""

    nodes: int = 1000            # nodes a domain owns: ENOSPC
    node_size: int = 2048        # bytes of one value: ENOSPC
    watches: int = 128           # E2BIG
    transactions: int = 10       # open at once: ENOSPC
    perms: int = 5               # entries of one permission list: ENOSPC


@dataclass
class State:
    """A version of the tree and how many nodes each domain owns in it."""

    root: Node
    owned: dict[int, int]


@dataclass(frozen=True)
class Change:
    """A node written (or re-permissioned), or a subtree removed; ``perms`` decide
    which guests may hear of it."""

    path: str
    perms: Perms
    removed: bool = False


@dataclass
class Transaction:
    id: int
    base: Node                   # the store's root when it started: commit needs it unchanged
    state: State
    changes: list[Change] = field(default_factory=list)


@dataclass
class Watch:
    session: Session
    path: str                    # as the client gave it (events use its form)
    absolute: str
    token: str


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def owners(root: Node) -> dict[int, int]:
    """How many nodes of the tree each domain owns."""
    return dict(collections.Counter(node.perms[0].domid for _, node in root.walk("/")))


class Session:
    """A client's view of the store: domain ``domid``; ``deliver(path, token)`` sends
    a watch event to the client (called with the store locked: it must only queue).
    Without ``deliver`` (a session loaded from a snapshot) events are held until
    :meth:`attach`."""

    def __init__(self, store: Store, domid: int, deliver: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.domid = domid
        self.home = domain_path(domid)
        self.held: list[tuple[str, str]] = []
        self.deliver = deliver or (lambda path, token: self.held.append((path, token)))
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}

    def attach(self, deliver: Callable[[str, str], None]) -> None:
        """Deliver to ``deliver`` from now on, starting with the events held so far."""
        with self.store.lock:
            self.deliver = deliver
            held, self.held = self.held, []
            for path, token in held:
                deliver(path, token)

    # Each call takes the store's lock and passes itself on.
    def read(self, tx: int, path: str) -> bytes:
        with self.store.lock:
            return self.store.read(self, tx, path)

    def directory(self, tx: int, path: str) -> tuple[int, list[str]]:
        with self.store.lock:
            return self.store.directory(self, tx, path)

    def get_perms(self, tx: int, path: str) -> Perms:
        with self.store.lock:
            return self.store.get_perms(self, tx, path)

    def write(self, tx: int, path: str, value: bytes) -> None:
        with self.store.lock:
            self.store.write(self, tx, path, value)

    def mkdir(self, tx: int, path: str) -> None:
        with self.store.lock:
            self.store.write(self, tx, path, b"", mkdir=True)

    def rm(self, tx: int, path: str) -> None:
        with self.store.lock:
            self.store.rm(self, tx, path)

    def set_perms(self, tx: int, path: str, perms: Perms) -> None:
        with self.store.lock:
            self.store.set_perms(self, tx, path, perms)

    def transaction_start(self) -> int:
        with self.store.lock:
            return self.store.transaction_start(self)

    def transaction_end(self, tx: int, commit: bool) -> None:
        with self.store.lock:
            self.store.transaction_end(self, tx, commit)

    def watch(self, path: str, token: str) -> Watch:
        """Register; the caller sends the reply, then :meth:`fire_initial`."""
        with self.store.lock:
            return self.store.watch(self, path, token)

    def fire_initial(self, watch: Watch) -> None:
        with self.store.lock:
            if watch in self.watches:
                self.deliver(watch.path, watch.token)

    def unwatch(self, path: str, token: str) -> None:
        with self.store.lock:
            self.store.unwatch(self, path, token)

    def reset(self) -> None:
        """RESET_WATCHES: drop this session's watches and transactions."""
        with self.store.lock:
            self.store.drop(self)

    def close(self) -> None:
        """The client is gone: its watches and transactions go with it."""
        with self.store.lock:
            self.store.drop(self)
            self.store.sessions.pop(self, None)


class Store:
    def __init__(self, guest_domid: int, quota: Quota | None = None) -> None:
        self.lock = threading.RLock()
        self.quota = quota or Quota()
        self.guest_domid = guest_domid
        self.gen = 0                 # the last generation count given to a node
        self.next_tx = 1
        # The open ones, in the order they came. A guest may hold several connections:
        # its watch and transaction quotas are the domain's, counted over all of them,
        # as in xenstored (which has one connection a domain).
        self.sessions: dict[Session, None] = {}
        self._unclaimed: list[Session] = []         # loaded guest sessions no connection has taken
        self.watches: list[Watch] = []
        root = self._node(b"", (Perm("n", DOM0),))
        self.state = State(root, {DOM0: 1})
        admin = Session(self, DOM0, lambda path, token: None)
        for path in ("/local", "/local/domain"):
            self.write(admin, 0, path, b"")
        home = domain_path(guest_domid)
        self.write(admin, 0, home, b"")
        self.set_perms(admin, 0, home, (Perm("n", guest_domid),))

    def session(self, domid: int, deliver: Callable[[str, str], None]) -> Session:
        """A new client's session. The guest's first connections after a load take up its
        loaded sessions, oldest first, with their watches, transactions and held events: its
        connections were closed by the snapshot (vsock resets them) and it connects again,
        as a Xen guest's ring would have carried on."""
        with self.lock:
            if domid == self.guest_domid and self._unclaimed:
                session = self._unclaimed.pop(0)
                session.attach(deliver)
                return session
            session = Session(self, domid, deliver)
            self.sessions[session] = None
            return session

    def restore(self, root: Node, gen: int, next_tx: int, guests: list[Session]) -> None:
        """Take a loaded tree and the guest's loaded sessions (see :mod:`.snapshot`) in place
        of the current ones. Guest sessions open here lose their watches and transactions;
        the loaded ones keep theirs, without initial events, until the guest's next
        connections take them up (:meth:`session`). Host sessions stay, and each of their
        watches fires once, as anything may have changed."""
        with self.lock:
            for session in self.sessions:
                if session.domid != DOM0:
                    self.drop(session)
            self.state = State(root, owners(root))
            self.gen, self.next_tx = gen, next_tx
            self._unclaimed = list(guests)
            for session in guests:
                self.sessions[session] = None
                self.watches += session.watches
            for w in self.watches:
                if w.session.domid == DOM0 and not w.absolute.startswith("@"):
                    w.session.deliver(w.path, w.token)

    # --- the tree ---
    def _node(self, value: bytes, perms: Perms, children: dict[str, Node] | None = None) -> Node:
        self.gen += 1
        return Node(value, perms, children if children is not None else {}, self.gen)

    def _replace(self, root: Node, parts: list[str], new: Node | None) -> Node:
        """``root`` with the node at ``parts`` replaced by ``new`` (None removes it): the
        nodes on the way down are copied, everything else is shared."""
        above = [root]
        for name in parts[:-1]:
            above.append(above[-1].children[name])
        below = new
        for node, name in zip(reversed(above), reversed(parts), strict=True):
            children = dict(node.children)
            if below is None:
                del children[name]
            else:
                children[name] = below
            below = self._node(node.value, node.perms, children)
        assert below is not None
        return below

    def _state(self, session: Session, tx: int) -> tuple[State, Transaction | None]:
        if tx == 0:
            return self.state, None
        txn = session.transactions.get(tx)
        if txn is None:
            raise XsError("ENOENT")
        return txn.state, txn

    @staticmethod
    def _lookup(root: Node, absolute: str) -> Node | None:
        node: Node | None = root
        for name in split(absolute):
            node = node.children.get(name) if node else None
        return node

    def _find(self, session: Session, tx: int, path: str, letter: str) -> Node:
        """The node at ``path``, which ``session`` must be allowed to ``letter`` (r/w)."""
        absolute = check_path(path, session.home)
        node = self._lookup(self._state(session, tx)[0].root, absolute)
        if node is None:
            raise XsError("ENOENT")
        if not can(node.perms, session.domid, letter):
            raise XsError("EACCES")
        return node

    def read(self, session: Session, tx: int, path: str) -> bytes:
        return self._find(session, tx, path, "r").value

    def directory(self, session: Session, tx: int, path: str) -> tuple[int, list[str]]:
        """The node's generation count and its children's names, sorted."""
        node = self._find(session, tx, path, "r")
        return node.gen, sorted(node.children)

    def get_perms(self, session: Session, tx: int, path: str) -> Perms:
        return self._find(session, tx, path, "r").perms

    def write(self, session: Session, tx: int, path: str, value: bytes, *, mkdir: bool = False) -> None:
        """WRITE (or MKDIR): missing parents are created empty, as mkdir -p does."""
        absolute = check_path(path, session.home)
        state, txn = self._state(session, tx)
        guest = session.domid != DOM0
        if guest and len(value) > self.quota.node_size:
            raise XsError("ENOSPC")
        parts = split(absolute)
        node, depth = state.root, 0
        while depth < len(parts) and (child := node.children.get(parts[depth])) is not None:
            node, depth = child, depth + 1
        if not can(node.perms, session.domid, "w"):       # the node, or the parent it goes under
            raise XsError("EACCES")
        if depth == len(parts):
            if mkdir:
                return
            perms = node.perms
            new = self._node(value, perms, node.children)
        else:
            # New nodes take their parent's permissions; a guest owns what it creates.
            perms = node.perms if not guest else (Perm(node.perms[0].letter, session.domid), *node.perms[1:])
            count = len(parts) - depth
            owner = perms[0].domid
            if guest and state.owned.get(owner, 0) + count > self.quota.nodes:
                raise XsError("ENOSPC")
            new = self._node(value, perms)
            for name in reversed(parts[depth + 1:]):
                new = self._node(b"", perms, {name: new})
            state.owned[owner] = state.owned.get(owner, 0) + count
            parts = parts[:depth + 1]
        state.root = self._replace(state.root, parts, new)
        self._changed(txn, Change(absolute, perms))

    def rm(self, session: Session, tx: int, path: str) -> None:
        """RM a node and everything below it; a missing node under an existing parent is OK."""
        absolute = check_path(path, session.home)
        if absolute == "/":
            raise XsError("EINVAL")
        state, txn = self._state(session, tx)
        node = self._lookup(state.root, absolute)
        if node is None:
            if self._lookup(state.root, absolute.rsplit("/", 1)[0] or "/") is not None:
                return
            raise XsError("ENOENT")
        if not can(node.perms, session.domid, "w"):
            raise XsError("EACCES")
        for _, gone in node.walk(absolute):
            state.owned[gone.perms[0].domid] -= 1
        state.root = self._replace(state.root, split(absolute), None)
        self._changed(txn, Change(absolute, node.perms, removed=True))

    def set_perms(self, session: Session, tx: int, path: str, perms: Perms) -> None:
        """Only the owner or dom0 may; a guest may not give the node away."""
        if not perms:
            raise XsError("EINVAL")
        absolute = check_path(path, session.home)
        state, txn = self._state(session, tx)
        node = self._lookup(state.root, absolute)
        if node is None:
            raise XsError("ENOENT")
        if session.domid not in (DOM0, node.perms[0].domid):
            raise XsError("EACCES")
        if session.domid != DOM0:
            if perms[0].domid != node.perms[0].domid:
                raise XsError("EACCES")
            if len(perms) > self.quota.perms:
                raise XsError("ENOSPC")
        old, new = node.perms[0].domid, perms[0].domid
        state.owned[old] -= 1
        state.owned[new] = state.owned.get(new, 0) + 1
        state.root = self._replace(state.root, split(absolute), self._node(node.value, perms, node.children))
        self._changed(txn, Change(absolute, perms))

    # --- transactions ---
    def transaction_start(self, session: Session) -> int:
        if session.domid != DOM0 and sum(len(s.transactions) for s in self.sessions
                                         if s.domid == session.domid) >= self.quota.transactions:
            raise XsError("ENOSPC")
        tx, self.next_tx = self.next_tx, (self.next_tx % 0xFFFFFFFF) + 1
        snapshot = State(self.state.root, dict(self.state.owned))
        session.transactions[tx] = Transaction(tx, self.state.root, snapshot)
        return tx

    def transaction_end(self, session: Session, tx: int, commit: bool) -> None:
        txn = session.transactions.pop(tx, None)
        if txn is None:
            raise XsError("ENOENT")
        if not commit:
            return
        if self.state.root is not txn.base:
            raise XsError("EAGAIN")
        self.state = txn.state
        for change in txn.changes:
            self._fire(change)

    # --- watches ---
    def watch(self, session: Session, path: str, token: str) -> Watch:
        absolute = check_path(path, session.home, watch=True)
        if any(w.absolute == absolute and w.token == token for w in session.watches):
            raise XsError("EEXIST")
        if session.domid != DOM0 and \
                sum(w.session.domid == session.domid for w in self.watches) >= self.quota.watches:
            raise XsError("E2BIG")
        w = Watch(session, path, absolute, token)
        session.watches.append(w)
        self.watches.append(w)
        return w

    def unwatch(self, session: Session, path: str, token: str) -> None:
        absolute = check_path(path, session.home, watch=True)
        for w in session.watches:
            if w.absolute == absolute and w.token == token:
                session.watches.remove(w)
                self.watches.remove(w)
                return
        raise XsError("ENOENT")

    def drop(self, session: Session) -> None:
        for w in session.watches:
            self.watches.remove(w)
        session.watches.clear()
        session.transactions.clear()

    def _changed(self, txn: Transaction | None, change: Change) -> None:
        if txn is not None:
            txn.changes.append(change)          # heard of at commit, or never
        else:
            self._fire(change)

    def _fire(self, change: Change) -> None:
        """Tell every watch on the changed path or above it; a removal also tells the
        watches below the removed node, with their own paths."""
        path = change.path
        for w in list(self.watches):
            target = w.absolute
            if target == path or path.startswith(target if target == "/" else target + "/"):
                event = path
            elif change.removed and target.startswith(path + "/"):
                event = target
            else:
                continue
            session = w.session
            if not can(change.perms, session.domid, "r"):
                continue
            if not w.path.startswith("/"):      # registered relative: relative events
                event = event[len(session.home) + 1:]
            session.deliver(event, w.token)


__all__ = ["DOM0", "Perm", "Quota", "Session", "Store", "XsError", "domain_path"]
