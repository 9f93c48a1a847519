"""QMP's migration commands (QEMU's shapes): migrate, migrate-incoming, query-migrate,
migrate_cancel, migrate-set-parameters, query-migrate-parameters, and the capabilities
(events only)."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError
from ..config.model import IncomingConfig
from ..config.validate import parse_migration_uri
from ..vmm.actions import (
    CancelMigration,
    Incoming,
    Migrate,
    QueryMigration,
    QueryMigrationParameters,
    SetMigrationParameters,
)
from ..vmm.hotplug import HotplugError
from ..vmm.lifecycle import StateError
from ..vmm.machine import Machine
from ..vmm.migration import MigrationError
from .qmp import Command, QmpError

MAX_DOWNTIME_MS = 2_000_000     # QEMU's limit for downtime-limit


def migration_commands(machine: Machine) -> dict[str, Command]:
    """The commands, each a request to ``machine`` (see vmm/actions.py)."""
    def checked(action: Any) -> object:
        try:
            action()
        except (ConfigError, MigrationError, StateError, HotplugError) as e:
            raise QmpError("GenericError", str(e)) from e
        return {}

    def migrate(args: dict[str, Any]) -> object:
        if args.get("detach") is False or args.get("blk") or args.get("inc"):
            raise QmpError("GenericError", "only detached migrations of RAM and devices are supported")
        if args.get("resume"):
            raise QmpError("GenericError", "postcopy is not supported: there is nothing to resume")
        return checked(lambda: machine.request(Migrate(parse_migration_uri("uri", args["uri"]))))

    def migrate_incoming(args: dict[str, Any]) -> object:
        mem = args.get("mem", "map")
        if mem not in ("map", "copy"):
            raise QmpError("GenericError", "Parameter 'mem' expects map or copy")
        return checked(lambda: machine.request(Incoming(IncomingConfig(
            parse_migration_uri("uri", args["uri"]), args.get("resume", False), mem == "map"))))

    def set_parameters(args: dict[str, Any]) -> object:
        bandwidth, downtime = args.get("max-bandwidth"), args.get("downtime-limit")
        if bandwidth is not None and bandwidth < 0:
            raise QmpError("GenericError", "Parameter 'max-bandwidth' expects a size of 0 (no limit) or more")
        if downtime is not None and not 0 <= downtime <= MAX_DOWNTIME_MS:
            raise QmpError("GenericError", f"Parameter 'downtime-limit' expects an integer in the range "
                                           f"of 0 to {MAX_DOWNTIME_MS} milliseconds")
        return checked(lambda: machine.request(SetMigrationParameters(bandwidth, downtime)))

    def set_capabilities(args: dict[str, Any]) -> object:
        for cap in args["capabilities"]:
            if not isinstance(cap, dict) or set(cap) != {"capability", "state"} \
                    or not isinstance(cap["state"], bool):
                raise QmpError("GenericError", "Invalid parameter 'capabilities': expected "
                                               "[{\"capability\": NAME, \"state\": BOOL}]")
            if cap["state"] and cap["capability"] != "events":
                raise QmpError("GenericError", f"Migration capability '{cap['capability']}' is not "
                                               "supported; only 'events' is (and always on)")
        return {}

    return {
        "migrate": Command(migrate, {"uri": (str, True), "detach": (bool, False), "blk": (bool, False),
                                     "inc": (bool, False), "resume": (bool, False)}),
        # resume and mem are AltoVirt's: run once loaded (Firecracker's resume_vm), and how
        # a snapshot's memory comes in.
        "migrate-incoming": Command(migrate_incoming, {"uri": (str, True), "resume": (bool, False),
                                                       "mem": (str, False)}),
        "query-migrate": Command(lambda a: machine.request(QueryMigration())),
        "migrate_cancel": Command(lambda a: checked(lambda: machine.request(CancelMigration()))),
        "migrate-set-parameters": Command(set_parameters, {"max-bandwidth": (int, False),
                                                           "downtime-limit": (int, False)}),
        "query-migrate-parameters": Command(lambda a: machine.request(QueryMigrationParameters())),
        # QEMU's clients turn on MIGRATION events this way; AltoVirt always sends them.
        "migrate-set-capabilities": Command(set_capabilities, {"capabilities": (list, True)}),
        "query-migrate-capabilities": Command(lambda a: [{"capability": "events", "state": True}]),
    }
