"""MMDS's document in the XenStore, under the guest's home (``mmds/``), so that the host's
xenstore tools and the guest's XenStore connection read it, and watch it change, as they
read the rest of the tree.

The copy follows the document on every PUT and PATCH, in one transaction: objects and arrays
are directories (an array's entries named 0, 1, ...), strings are values as they are, other
values their JSON text. A key's characters that XenStore names do not take (anything but
letters, digits, ``-`` and ``_``) are written ``_XX``, their UTF-8 bytes in hex, and an empty
key ``_``. The subtree is dom0's; the guest may read it only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..mmds.store import Mmds
from .store import DOM0, Session, Store, domain_path
from .tree import Perm, XsError

log = logging.getLogger(__name__)
TRIES = 5                   # a transaction that races a guest's write is tried again
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def key(name: str) -> str:
    """A document's key as a XenStore path element."""
    return "".join(c if c in _PATH_CHARS else "".join(f"_{b:02x}" for b in c.encode()) for c in name) or "_"


def mirror(store: Store, mmds: Mmds) -> None:
    """Keep ``mmds``'s document in ``store`` from now on."""
    session = store.session(DOM0, lambda path, token: None)
    home = f"{domain_path(store.guest_domid)}/mmds"
    perms = (Perm("n", DOM0), Perm("r", store.guest_domid))

    def copy(data: Any) -> None:
        for _ in range(TRIES):
            tx = session.transaction_start()
            try:
                try:
                    session.rm(tx, home)
                except XsError as e:
                    if e.name != "ENOENT":
                        raise
                session.write(tx, home, b"")
                session.set_perms(tx, home, perms)
                if data is not None:
                    _write(session, tx, home, data)
            except XsError as e:
                session.transaction_end(tx, False)
                log.warning("MMDS: cannot copy the document into the XenStore: %s", e.name)
                return
            try:
                session.transaction_end(tx, True)
                return
            except XsError as e:
                if e.name != "EAGAIN":
                    log.warning("MMDS: cannot copy the document into the XenStore: %s", e.name)
                    return
        log.warning("MMDS: the XenStore copy lost %d races with the guest's writes; it is stale", TRIES)

    mmds.watch(copy)


def _write(session: Session, tx: int, path: str, value: Any) -> None:
    if isinstance(value, dict):
        items = [(key(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        session.write(tx, path, text.encode())
        return
    session.write(tx, path, b"")
    for name, child in items:
        _write(session, tx, f"{path}/{name}", child)
