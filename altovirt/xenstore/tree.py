"""XenStore nodes, paths and permissions (Xen's docs/misc/xenstore.txt).

Nodes are never changed once they are in a tree: a change copies the nodes
on the path from the root down to the changed one and shares everything else
(a persistent tree, as QEMU's xenstore_impl.c keeps). A tree is thus just a
root node, and a transaction can start from the store's current root in O(1).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import AltoVirtError

ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")
LETTERS = "rwbn"


class XsError(AltoVirtError):
    """A request fails with the errno name the protocol sends back (``ENOENT``...)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: a letter (r read, w write, b both, n none) for a domain."""

    letter: str
    domid: int

    def __str__(self) -> str:
        return f"{self.letter}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        if len(text) < 2 or text[0] not in LETTERS or not text[1:].isdigit() or int(text[1:]) >= 1 << 32:
            raise XsError("EINVAL")
        return cls(text[0], int(text[1:]))


Perms = tuple[Perm, ...]


def can(perms: Perms, domid: int, letter: str) -> bool:
    """May ``domid`` read (``letter`` "r") or write ("w") a node with ``perms``? The
    first entry names the owner and the default for everyone else; later entries
    override it per domain, the last match winning. dom0 and the owner may do anything."""
    if domid == 0 or domid == perms[0].domid:
        return True
    granted = perms[0].letter
    for p in perms[1:]:
        if p.domid == domid:
            granted = p.letter
    return granted == "b" or granted == letter


class Node:
    """A node: value, permissions, children (name -> Node) and its generation count,
    which changes whenever a new version of the node is made."""

    __slots__ = ("children", "gen", "perms", "value")

    def __init__(self, value: bytes, perms: Perms, children: dict[str, Node], gen: int) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.gen = gen

    def walk(self, path: str) -> Iterator[tuple[str, Node]]:
        """This node and every node below it, as (absolute path, node), ``path`` being this one's.
        Iterative: a path may be 1536 names deep, past Python's recursion limit."""
        stack = [(path, self)]
        while stack:
            path, node = stack.pop()
            yield path, node
            stack.extend((join(path, name), child) for name, child in node.children.items())


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def split(path: str) -> list[str]:
    """The names along an absolute path; [] for the root."""
    return [] if path == "/" else path[1:].split("/")


def check_path(path: str, home: str, *, watch: bool = False) -> str:
    """The absolute, checked form of a client's path (relative ones are under ``home``).

    EINVAL for characters outside ``a-zA-Z0-9-/_@``, an empty name (``//``), a
    trailing slash, or a path longer than the protocol allows. ``@`` names such as
    ``@introduceDomain`` are accepted as they are for watches only.
    """
    if watch and path.startswith("@"):
        if not _PATH_CHARS.fullmatch(path) or "/" in path:
            raise XsError("EINVAL")
        return path
    if not path or not _PATH_CHARS.fullmatch(path) or "@" in path:
        raise XsError("EINVAL")
    if path.startswith("/"):
        if len(path) > ABS_PATH_MAX:
            raise XsError("EINVAL")
        absolute = path
    else:
        if len(path) > REL_PATH_MAX:
            raise XsError("EINVAL")
        absolute = f"{home}/{path}"
    if absolute != "/" and (absolute.endswith("/") or "//" in absolute):
        raise XsError("EINVAL")
    return absolute
