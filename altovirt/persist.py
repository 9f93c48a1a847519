"""Component state as plain data, and the versioned envelope it travels in.

Every component whose state a snapshot must keep has ``save()``, returning a
frozen dataclass of plain values (ints, bools, bytes, tuples of them), and
``restore(state)``, which checks the whole state before using any of it: bad
state raises :class:`SavedStateError` and leaves the component as it was. Saved
state is written as versioned JSON (:func:`seal`) and read back with
:func:`unseal`, which refuses another format or a version this VMM does not
read (as Firecracker's persist does with its versioned state).

The envelope::

    {"format": "altovirt-<what>", "version": N, ...the fields of that version...}

Bytes travel as base64 text (:func:`to_json` and :func:`from_json` do that for
any saved state dataclass).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import typing
from typing import Any, Protocol, TypeVar

from .errors import AltoVirtError


class SavedStateError(AltoVirtError, ValueError):
    """Saved state this VMM cannot take; whatever was being restored is unchanged."""


class SaveError(AltoVirtError):
    """A component cannot be saved as it stands; nothing was saved."""


def seal(fmt: str, version: int, fields: dict[str, Any]) -> bytes:
    """The envelope of ``fields``, as compact JSON."""
    return json.dumps({"format": fmt, "version": version, **fields}, separators=(",", ":")).encode()


def unseal(data: bytes, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The fields of an envelope of ``fmt``, ``version``; SavedStateError naming ``what`` otherwise."""
    try:
        image = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SavedStateError(f"not {what}: {e}") from e
    if not isinstance(image, dict) or image.get("format") != fmt:
        raise SavedStateError(f"not {what}")
    if image.get("version") != version:
        raise SavedStateError(f"{what} version {image.get('version')!r}; this VMM reads version {version}")
    return {k: v for k, v in image.items() if k not in ("format", "version")}


def check(condition: bool, problem: str) -> None:
    if not condition:
        raise SavedStateError(problem)


def check_int(x: object, low: int, high: int, what: str) -> int:
    if type(x) is not int or not low <= x <= high:      # not bool, though bool is an int
        raise SavedStateError(f"{what} must be an integer from {low} to {high}, not {x!r}")
    return x


def check_bytes(x: object, what: str, size: int) -> bytes:
    if not isinstance(x, bytes) or len(x) != size:
        raise SavedStateError(f"{what} must be {size} bytes, not {x!r:.40}")
    return x


S = TypeVar("S")


class Persistent(Protocol[S]):
    """A component with saved state: the queues, the virtio-mmio transports, the legacy devices."""

    def save(self) -> S:
        """The state as a frozen dataclass of plain values."""
        ...

    def restore(self, state: S) -> None:
        """Take ``state`` whole, or raise SavedStateError and change nothing."""
        ...


def to_json(state: object) -> dict[str, Any]:
    """A saved state dataclass as JSON values: bytes as base64, tuples as lists, nested states too."""
    def value(v: object) -> object:
        if isinstance(v, int | str):                # bool too
            return v
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, tuple | list):
            return [value(x) for x in v]
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return to_json(v)
        return v
    assert dataclasses.is_dataclass(state) and not isinstance(state, type)
    return {f.name: value(getattr(state, f.name)) for f in dataclasses.fields(state)}


def from_json(cls: type[S], data: object, what: str) -> S:
    """``cls`` from :func:`to_json`'s output, by the field types ``cls`` declares (only the
    shapes saved states use: int, bool, bytes, str, nested states and tuples of them).
    Values are not range-checked here: ``restore`` does that."""
    if not isinstance(data, dict):
        raise SavedStateError(f"{what} must be an object")
    hints, required = _field_types(cls)
    if not required <= set(data) <= set(hints):
        raise SavedStateError(f"{what} must have the fields {sorted(hints)}, not {sorted(data)}")
    return cls(**{name: _from(hints[name], v, f"{what}.{name}") for name, v in data.items()})


_FIELD_TYPES: dict[type, tuple[dict[str, Any], set[str]]] = {}


def prepare(cls: type) -> None:
    """Resolve the field types of ``cls`` and of the states it holds now, so that reading a
    state later (a live migration's, while its guest waits) does not."""
    for hint in _field_types(cls)[0].values():
        for t in (hint, *typing.get_args(hint)):
            if isinstance(t, type) and dataclasses.is_dataclass(t) and t not in _FIELD_TYPES:
                prepare(t)


def _field_types(cls: type) -> tuple[dict[str, Any], set[str]]:
    """``cls``'s fields and their types, and the fields a saved state must have (a field with
    a default came later: a state saved before it lacks it); resolved once (resolving compiles
    the annotations: a millisecond a restore otherwise)."""
    found = _FIELD_TYPES.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        found = _FIELD_TYPES[cls] = ({f.name: hints[f.name] for f in fields}, required)
    return found


def _from(hint: Any, v: object, what: str) -> object:
    if hint is bytes:
        if not isinstance(v, str):
            raise SavedStateError(f"{what} must be base64 text")
        try:
            return base64.b64decode(v, validate=True)
        except binascii.Error as e:
            raise SavedStateError(f"{what} must be base64 text") from e
    if hint is str:
        if not isinstance(v, str):
            raise SavedStateError(f"{what} must be text")
        return v
    if hint is bool:
        if type(v) is not bool:
            raise SavedStateError(f"{what} must be true or false")
        return v
    if hint is int:
        if type(v) is not int:
            raise SavedStateError(f"{what} must be an integer")
        return v
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)           # tuple[X, ...]
        if not isinstance(v, list):
            raise SavedStateError(f"{what} must be a list")
        # The long ones (a vCPU's registers, a GIC's) are ints or bytes: checked whole, each
        # item named only if one is wrong, as a live migration's downtime waits for this.
        if item is int and all(type(x) is int for x in v):
            return tuple(v)
        if item is bytes and all(isinstance(x, str) for x in v):
            try:
                return tuple(base64.b64decode(x, validate=True) for x in v)
            except binascii.Error:
                pass                                # named below
        return tuple(_from(item, x, f"{what}[{i}]") for i, x in enumerate(v))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_json(hint, v, what)
    raise TypeError(f"{what}: a saved state cannot hold {hint!r}")

