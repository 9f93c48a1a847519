"""Which operation of Firecracker's API a request asks for, decided as Firecracker 1.16 decides
it (``src/firecracker/src/api_server/parsed_request.rs`` and ``request/*.rs``).

The path is cut at each ``/`` after its leading ones, a trailing empty segment dropped (Rust's
``split_terminator``). The first segment and the method choose the operation; what follows is
read only where the operation takes it (a resource id, the snapshot's operation, a balloon
or hotplug sub-resource) and ignored otherwise, so ``PUT /vsock/vsock0`` is ``PUT /vsock``.
Whether there is a body is checked in Firecracker's order, and resource ids in paths are
checked before any body is read. Everything else (the body, the id in it, the VM's phase)
is the operation's to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.firecracker import FirecrackerError

EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."
# parsed_request.rs's method_to_error: a body where none belongs, or none where one must be.
BODY_ERRORS = {"GET": "GET request cannot have a body.", "PUT": "Empty PUT request.",
               "PATCH": "Empty PATCH request.", "DELETE": "Empty Delete request."}

# (method, first segment) -> operation, for the operations that take no more of the path.
_PLAIN = {
    ("GET", ""): "get_info", ("GET", "version"): "get_version",
    ("GET", "machine-config"): "get_machine_config", ("GET", "mmds"): "get_mmds",
    ("PUT", "actions"): "put_actions", ("PUT", "balloon"): "put_balloon",
    ("PUT", "boot-source"): "put_boot_source", ("PUT", "cpu-config"): "put_cpu_config",
    ("PUT", "logger"): "put_logger", ("PUT", "serial"): "put_serial",
    ("PUT", "machine-config"): "put_machine_config", ("PUT", "metrics"): "put_metrics",
    ("PUT", "vsock"): "put_vsock", ("PUT", "entropy"): "put_entropy",
    ("PATCH", "machine-config"): "patch_machine_config", ("PATCH", "mmds"): "patch_mmds",
    ("PATCH", "vm"): "patch_vm",
}
# Operations on a resource named by the second segment: (method, first segment) -> operation.
_BY_ID = {
    ("PUT", "drives"): "put_drive", ("PUT", "network-interfaces"): "put_network_interface",
    ("PUT", "pmem"): "put_pmem",
    ("PATCH", "drives"): "patch_drive", ("PATCH", "network-interfaces"): "patch_network_interface",
    ("PATCH", "pmem"): "patch_pmem",
    ("DELETE", "drives"): "delete_drive", ("DELETE", "network-interfaces"): "delete_network_interface",
    ("DELETE", "pmem"): "delete_pmem",
}


@dataclass(frozen=True)
class Route:
    """An operation (named after Firecracker's method and resource, e.g. ``put_drive``), its
    resource (the path's first segment) and the resource id the path names ("" if it names none)."""

    operation: str
    resource: str
    id: str = ""


def checked_id(segment: str | None) -> str:
    """A resource id from a path: not empty, and only alphanumeric characters (Unicode's, as
    Rust's ``char::is_alphanumeric``) and ``_``."""
    if not segment:
        raise FirecrackerError(EMPTY_ID)
    if not all(c == "_" or c.isalnum() for c in segment):
        raise FirecrackerError(INVALID_ID)
    return segment


def segments(path: str) -> list[str]:
    """The path's segments as Firecracker cuts them."""
    parts = path.lstrip("/").split("/")
    return parts[:-1] if parts[-1] == "" else parts


def route(method: str, path: str, has_body: bool) -> Route:
    """The operation ``method`` on ``path`` asks for; FirecrackerError (a 400's fault_message)
    if it asks for none."""
    tokens = segments(path)
    first = tokens[0] if tokens else ""
    second = tokens[1] if len(tokens) > 1 else None
    third = tokens[2] if len(tokens) > 2 else None
    if (method, first) == ("PATCH", "balloon"):         # the one operation whose body may be absent
        return _patch_balloon(second, third, has_body)
    wants_body = method in ("PUT", "PATCH")
    if method in BODY_ERRORS and has_body != wants_body:
        raise FirecrackerError(BODY_ERRORS[method])
    plain = _PLAIN.get((method, first))
    if plain is not None:
        return Route(plain, first)
    by_id = _BY_ID.get((method, first))
    if by_id is not None:
        return Route(by_id, first, checked_id(second))
    if method == "GET" and first == "balloon":
        return _get_balloon(second, third)
    if (method, first, second) in (("GET", "vm", "config"), ("GET", "hotplug", "memory"),
                                   ("PUT", "hotplug", "memory"), ("PATCH", "hotplug", "memory")):
        return Route(f"{method.lower()}_{first}_{second}", first)
    if (method, first) == ("PUT", "mmds"):
        if second is None or second == "config":
            return Route("put_mmds" if second is None else "put_mmds_config", first)
        raise FirecrackerError(f"Unrecognized PUT request path `{second}`.")
    if (method, first) == ("PUT", "snapshot"):
        if second is None:
            raise FirecrackerError("Missing snapshot operation type.")
        if second not in ("create", "load", "fork"):          # fork: AltoVirt's (api/firecracker.py)
            raise FirecrackerError(f"Invalid request method and/or path: PUT /snapshot/{second}.")
        return Route(f"put_snapshot_{second}", first)
    raise FirecrackerError(f"Invalid request method and/or path: {method} {first}.")


def _get_balloon(second: str | None, third: str | None) -> Route:
    if second is None:
        return Route("get_balloon", "balloon")
    if second == "statistics":
        return Route("get_balloon_statistics", "balloon")
    if second != "hinting":
        raise FirecrackerError(f"Unrecognized GET request path `{second}`.")
    if third == "status":
        return Route("get_balloon_hinting_status", "balloon")
    raise FirecrackerError(f"Unrecognized GET request path `/hinting/{third or ''}`.")


def _patch_balloon(second: str | None, third: str | None, has_body: bool) -> Route:
    if second == "hinting":
        if third in ("start", "stop"):                  # start's body is optional, stop's ignored
            return Route(f"patch_balloon_hinting_{third}", "balloon")
        raise FirecrackerError(f"Unrecognized PATCH request path `/hinting/{third or ''}`.")
    if not has_body:
        raise FirecrackerError(BODY_ERRORS["PATCH"])
    return Route("patch_balloon_statistics" if second == "statistics" else "patch_balloon", "balloon")
