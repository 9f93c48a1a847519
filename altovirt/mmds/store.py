"""The MMDS data store (Firecracker's ``src/vmm/src/mmds/data_store.rs``): one JSON document,
replaced by a PUT and merged into by a PATCH (RFC 7396), that may not grow past its limit;
read by path (a JSON pointer, RFC 6901) as JSON or in EC2's IMDS form.

Any thread may use it: the API's, and the I/O thread that answers the guest. Watchers (the
XenStore's copy) hear each new document.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from typing import Any

from ..config.model import MMDS_SIZE_LIMIT
from ..errors import AltoVirtError
from .token import TokenAuthority


class StoreError(AltoVirtError):
    """What the store says of a request it cannot do; the message is Firecracker's."""


class LimitExceeded(StoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS patch request doesn't fit.")


class NotInitialized(StoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS data store is not initialized.")


class NotFound(StoreError):
    def __init__(self) -> None:
        super().__init__("The MMDS resource does not exist.")


class Unsupported(StoreError):
    def __init__(self) -> None:
        super().__init__("Cannot retrieve value. The value has an unsupported type.")


def dumps(value: Any) -> str:
    """JSON as serde_json writes a Value: compact, keys in order (its maps are sorted)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` merged in (RFC 7396): a null removes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def pointer(doc: Any, path: str) -> Any:
    """The value at JSON pointer ``path``; NotFound if there is none."""
    if path == "":
        return doc
    if not path.startswith("/"):
        raise NotFound()
    value = doc
    for token in path[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and (token == "0" or not token.startswith("0")) \
                and int(token) < len(value):
            value = value[int(token)]
        else:
            raise NotFound()
    return value


def imds(value: Any) -> str:
    """EC2's IMDS form: an object's keys, one a line, those of objects ending in '/'; a
    string itself; Unsupported for anything else."""
    if isinstance(value, dict):
        return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in sorted(value.items()))
    if isinstance(value, str):
        return value
    raise Unsupported()


class Mmds:
    def __init__(self, limit: int = MMDS_SIZE_LIMIT) -> None:
        self.limit = limit
        self.version = "V1"
        self.imds_compat = False
        self.tokens = TokenAuthority()
        self._data: Any = None
        self._initialized = False
        self._lock = threading.Lock()
        self._watchers: list[Callable[[Any], None]] = []

    def watch(self, watcher: Callable[[Any], None]) -> None:
        """Call ``watcher`` with each new document (and now, with this one)."""
        with self._lock:
            self._watchers.append(watcher)
            data = self._data
        watcher(data)

    def _set(self, data: Any) -> None:
        if len(dumps(data).encode()) > self.limit:
            raise LimitExceeded()
        self._data, self._initialized = data, True
        for watcher in self._watchers:
            watcher(data)

    def put(self, data: Any) -> None:
        with self._lock:
            self._set(data)

    def patch(self, patch: Any) -> None:
        with self._lock:
            if not self._initialized:
                raise NotInitialized()
            self._set(merge_patch(self._data, patch))

    def value(self) -> Any:
        """The whole document (null before any PUT)."""
        with self._lock:
            return copy.deepcopy(self._data)

    def get(self, path: str, as_json: bool) -> str:
        """The text of the value at ``path`` (one trailing '/' ignored), as JSON or in IMDS form
        (always IMDS with imds_compat); NotFound, Unsupported."""
        with self._lock:
            value = pointer(self._data, path[:-1] if path.endswith("/") else path)
            return dumps(value) if as_json and not self.imds_compat else imds(value)
