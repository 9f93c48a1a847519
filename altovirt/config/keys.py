"""The one check of an object's keys, for every surface that takes named values.

The command line's ``key=value`` lists, the ``-config`` JSON objects, Firecracker's
API bodies and QMP's arguments all ask the same questions of an object: is each
key one it takes, is each value of a type that key takes, is each required key
there. :func:`find_key_problem` answers them, in one order, and returns the first
problem as data (:class:`KeyProblem`). Each surface words it with its own template,
kept once beside that surface, because clients match the words: QMP's are QEMU's
(``altovirt.api.qmp``), Firecracker's are serde's (``firecracker.py``), and
AltoVirt's own two surfaces, the command line and ``-config``, share
:func:`check_keys`'s.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .model import ConfigError

Types = type | tuple[type, ...]
"""What a key's value may be: one type or several; ``object`` takes any value."""


class Problem(enum.Enum):
    UNKNOWN = "unknown"             # a key the object does not take
    WRONG_TYPE = "wrong type"       # a key it takes, with a value of none of the key's types
    MISSING = "missing"             # a required key that is absent


@dataclass(frozen=True)
class KeyProblem:
    """What is wrong with one key of an object."""

    kind: Problem
    key: str
    expected: tuple[type, ...] = ()     # WRONG_TYPE: the types the key takes, as declared
    accepted: tuple[str, ...] = ()      # UNKNOWN: every key the object takes, required first, as declared


def _has_type(value: object, types: tuple[type, ...]) -> bool:
    # JSON's true and false are not numbers, though Python's bool is an int.
    if isinstance(value, bool):
        return bool in types or object in types
    return isinstance(value, types)


def find_key_problem(given: Mapping[str, object], required: Mapping[str, Types],
                     optional: Mapping[str, Types]) -> KeyProblem | None:
    """The first problem with ``given``'s keys, or None if there is none.

    The order, the same on every surface: ``given``'s keys in their own order (the
    order the user wrote them), the first that is unknown or has a value of the
    wrong type; then the first of ``required``'s keys, in its order, that is absent.
    Values are only checked against their types here: ranges and formats are the
    caller's. A key in both ``required`` and ``optional`` takes ``required``'s types.
    """
    for key, value in given.items():
        types = required.get(key, optional.get(key))
        if types is None:
            return KeyProblem(Problem.UNKNOWN, key, accepted=(*required, *optional))
        types = types if isinstance(types, tuple) else (types,)
        if not _has_type(value, types):
            return KeyProblem(Problem.WRONG_TYPE, key, expected=types)
    missing = next((key for key in required if key not in given), None)
    return None if missing is None else KeyProblem(Problem.MISSING, missing)


def check_keys(where: str, given: Mapping[str, object], required: Collection[str],
               optional: Collection[str]) -> None:
    """AltoVirt's own surfaces (the command line's ``key=value`` lists, ``-config``'s objects):
    ConfigError ``<where>: unknown key 'x'; accepted: a, b`` (every key, sorted) or
    ``<where>: missing key 'x'``. Their values are checked one by one afterwards, with
    messages that say what the value should be, so no type is checked here. The keys
    are sets, without an order of their own, so required keys are looked for in sorted order.
    """
    problem = find_key_problem(given, dict.fromkeys(sorted(required), object),
                               dict.fromkeys(sorted(optional), object))
    if problem is None:
        return
    if problem.kind is Problem.UNKNOWN:
        accepted = ", ".join(sorted(problem.accepted))
        raise ConfigError(f"{where}: unknown key {problem.key!r}; accepted: {accepted}")
    raise ConfigError(f"{where}: missing key {problem.key!r}")
