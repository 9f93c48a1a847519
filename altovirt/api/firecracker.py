"""Firecracker's REST API (its ``firecracker.yaml``) on :mod:`.http`, for an :class:`Instance`.

Requests are answered as Firecracker answers them: 204 with no body, 200 with
a JSON body, or 400 with ``{"fault_message": ...}`` (also for a request in the
wrong phase: pre-boot only after the start, post-boot only before it). What
AltoVirt does not have answers 400 saying so. Each handler runs on the API
thread; what touches the VM goes through the Machine's thread-safe entry
points.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from .. import FIRECRACKER_API_VERSION, __version__
from ..config.firecracker import (
    DESERIALIZE,
    DRIVE_ERROR,
    UNSUPPORTED,
    FirecrackerConfig,
    FirecrackerError,
    LoggerConfig,
    MmdsLimitExceeded,
    export_balloon,
    fields,
    not_supported,
    rate_limiter_patch,
    unsigned,
)
from ..config.model import PAGES_PER_MIB, MigrationUri, RateLimiterConfig
from ..errors import AltoVirtError
from ..mmds.store import LimitExceeded, NotInitialized, StoreError, dumps, merge_patch
from ..snapshot import format as snapfile
from ..vmm import snapshot
from ..vmm.actions import (
    ChangeImage,
    CtrlAltDel,
    ForkVm,
    FreePageHinting,
    Migrate,
    Pause,
    PutMetadata,
    QueryBalloon,
    QueryMetadata,
    QueryMigration,
    Resume,
    SetBalloon,
    SetBalloonStats,
    SetRateLimiter,
)
from ..vmm.hotplug import HotplugError
from ..vmm.instance import Instance, Launch
from ..vmm.lifecycle import RunState
from ..vmm.metrics import Metrics
from .firecracker_routes import Route, route, segments
from .http import Request, Response, fault

APP_NAME = "AltoVirt"
VERSION = {"firecracker_version": FIRECRACKER_API_VERSION}
# What AltoVirt does not have, by resource (a path's first segment).
UNSUPPORTED_RESOURCES = {"hotplug": UNSUPPORTED["memory-hotplug"], "pmem": UNSUPPORTED["pmem"]}
NO_BALLOON = "Balloon config error: No balloon device found."
# Firecracker hot-plugs drives and NICs (PUT and DELETE after the start) on PCI only
# (device_manager/mod.rs); AltoVirt's are virtio-mmio, hot-plugged through QMP (--qmp).
PCI_NOT_ENABLED = "PCI is not enabled"


def _json(request: Request) -> object:
    assert request.body is not None
    try:
        return json.loads(request.body)
    except (ValueError, RecursionError) as e:
        raise FirecrackerError(f"{DESERIALIZE}: {e}.") from e


class FirecrackerApi:
    """The operations (see :mod:`.firecracker_routes`) -> handler(request, route).
    ``on_logger`` applies a PUT /logger; ``metrics`` takes PUT /metrics and FlushMetrics."""

    def __init__(self, instance: Instance, metrics: Metrics,
                 on_logger: Callable[[LoggerConfig], None]) -> None:
        self.instance = instance
        self.metrics = metrics
        self._timed: str | None = None      # the timed operation the request in hand did
        cfg = self._configure
        self.handlers: dict[str, Callable[[Request, Route], Response]] = {
            "get_info": lambda r, route: Response(200, self._info()),
            "get_version": lambda r, route: Response(200, VERSION),
            "get_machine_config": lambda r, route: Response(200, self._export()["machine-config"]),
            "get_vm_config": lambda r, route: Response(200, self._export()),
            "put_boot_source": cfg(lambda c, b, route: c.put_boot_source(b)),
            "put_machine_config": cfg(lambda c, b, route: c.put_machine_config(b)),
            "put_cpu_config": cfg(lambda c, b, route: c.put_cpu_config(b)),
            "patch_machine_config": cfg(lambda c, b, route: c.put_machine_config(b, partial=True)),
            "put_drive": self._put_device(lambda c, b, route: c.put_drive(route.id, b)),
            "put_network_interface": self._put_device(
                lambda c, b, route: c.put_network_interface(route.id, b)),
            "put_vsock": cfg(lambda c, b, route: c.put_vsock(b)),
            "put_entropy": cfg(lambda c, b, route: c.put_entropy(b)),
            "put_logger": cfg(lambda c, b, route: on_logger(c.put_logger(b))),
            "put_metrics": cfg(lambda c, b, route: metrics.open(c.put_metrics(b))),
            "put_actions": self._action,
            "patch_vm": self._patch_vm,
            "patch_drive": self._patch_drive,
            "patch_network_interface": self._patch_net,
            "delete_drive": self._unplug,
            "delete_network_interface": self._unplug,
            "put_balloon": cfg(lambda c, b, route: c.put_balloon(b)),
            "put_serial": cfg(lambda c, b, route: c.put_serial(b)),
            "get_balloon": self._get_balloon,
            "patch_balloon": self._patch_balloon,
            "get_balloon_statistics": self._balloon_statistics,
            "patch_balloon_statistics": self._patch_balloon,
            **dict.fromkeys(("get_balloon_hinting_status", "patch_balloon_hinting_start",
                             "patch_balloon_hinting_stop"), self._hinting),
            "put_mmds_config": cfg(lambda c, b, route: c.put_mmds_config(b)),
            "put_mmds": self._metadata,
            "patch_mmds": self._metadata,
            "get_mmds": self._metadata,
            "put_snapshot_create": lambda r, route: self._create_snapshot(_json(r)),
            "put_snapshot_load": lambda r, route: self._load_snapshot(_json(r)),
            "put_snapshot_fork": lambda r, route: self._fork(_json(r)),
        }

    def __call__(self, request: Request) -> Response:
        first = (segments(request.path) or [""])[0]
        self.metrics.count(request.method, first)
        began, self._timed = time.monotonic(), None
        response = self._call(request)
        if response.status >= 400:
            self.metrics.failed(request.method, first)
        elif self._timed is not None:       # the whole request's time, beside the VMM's part
            self.metrics.latency(self._timed, time.monotonic() - began)
        return response

    def _vmm_took(self, operation: str, began: float) -> None:
        """``operation`` (of metrics.LATENCIES) went through, the VMM's part from ``began``."""
        self.metrics.latency(f"vmm_{operation}", time.monotonic() - began)
        self._timed = operation

    def _call(self, request: Request) -> Response:
        try:
            found = route(request.method, request.path, request.body is not None)
            handler = self.handlers.get(found.operation)
            if handler is None:
                raise not_supported(UNSUPPORTED_RESOURCES[found.resource])
            return handler(request, found)
        except MmdsLimitExceeded as e:
            return fault(413, str(e))
        except AltoVirtError as e:
            return fault(400, str(e))

    # --- before the start ---
    def _configure(self, change: Callable[[FirecrackerConfig, object, Route], object]
                   ) -> Callable[[Request, Route], Response]:
        def handler(request: Request, found: Route) -> Response:
            body = _json(request)
            self.instance.configure(lambda c: change(c, body, found))
            return Response(204)
        return handler

    def _put_device(self, change: Callable[[FirecrackerConfig, object, Route], object]
                    ) -> Callable[[Request, Route], Response]:
        """A PUT of a drive or NIC: before the start, configuration; after it, a hot-plug, which
        Firecracker does on PCI alone."""
        configure = self._configure(change)

        def handler(request: Request, found: Route) -> Response:
            if self.instance.machine is not None:
                raise FirecrackerError(PCI_NOT_ENABLED)
            return configure(request, found)
        return handler

    def _metadata(self, request: Request, found: Route) -> Response:
        """PUT, PATCH and GET /mmds: on the configuration before the start, on the running VM's
        store after it (as Firecracker, where both hold the one store)."""
        body = None if request.method == "GET" else _json(request)
        patch = request.method == "PATCH"
        if self.instance.machine is None:
            return self.instance.configure(lambda c: _metadata_before(c, request.method, body))
        machine = self.instance.running()
        try:
            if request.method == "GET":
                data = machine.request(QueryMetadata())
                return Response(200, data if data is not None else {})
            machine.request(PutMetadata(body, patch))
        except LimitExceeded as e:
            raise MmdsLimitExceeded() from e
        except StoreError as e:
            raise FirecrackerError(f"MMDS error: {e}") from e
        return Response(204)

    def _get_balloon(self, request: Request, found: Route) -> Response:
        """The balloon's settings (its target as last set), before or after the start."""
        balloon = self.instance.config.balloon
        if balloon is None:
            raise FirecrackerError(NO_BALLOON)
        return Response(200, export_balloon(balloon))

    def _patch_balloon(self, request: Request, found: Route) -> Response:
        """A running balloon's new target, or statistics polling interval."""
        if found.operation == "patch_balloon":
            b = fields("balloon", _json(request), {"amount_mib": int}, {})
            action: SetBalloon | SetBalloonStats = SetBalloon(unsigned(b["amount_mib"], 32) * PAGES_PER_MIB)
        else:
            b = fields("balloon statistics", _json(request), {"stats_polling_interval_s": int}, {})
            action = SetBalloonStats(unsigned(b["stats_polling_interval_s"], 16))
        machine = self.instance.running()
        if self.instance.config.balloon is None:
            raise FirecrackerError(NO_BALLOON)
        try:
            machine.request(action)
        except AltoVirtError as e:
            raise FirecrackerError(f"Balloon update error: {e}") from e
        return Response(204)

    def _hinting(self, request: Request, found: Route) -> Response:
        """Free page hinting: start a run (``acknowledge_on_stop``, true if not said), stop it,
        or its status."""
        command = found.operation.rsplit("_", 1)[1]
        acknowledge = True
        if command == "start" and request.body:
            b = fields("hinting", _json(request), {}, {"acknowledge_on_stop": bool})
            acknowledge = b.get("acknowledge_on_stop", True)
        machine = self.instance.running()
        if self.instance.config.balloon is None:
            raise FirecrackerError(NO_BALLOON)
        try:
            answer = machine.request(FreePageHinting(command, acknowledge))
        except AltoVirtError as e:
            raise FirecrackerError(f"Balloon update error: {e}") from e
        return Response(200, answer) if command == "status" else Response(204)

    def _balloon_statistics(self, request: Request, found: Route) -> Response:
        machine = self.instance.running()
        balloon = self.instance.config.balloon
        if balloon is None:
            raise FirecrackerError(NO_BALLOON)
        if not balloon.stats_polling_interval_s:
            raise FirecrackerError("Internal VMM error: Balloon: Received stats query when stats are "
                                   "disabled.")
        return Response(200, machine.request(QueryBalloon()))

    def _unplug(self, request: Request, found: Route) -> Response:
        self.instance.running()
        raise FirecrackerError(PCI_NOT_ENABLED)

    def _start(self) -> None:
        self.instance.launch(lambda c: Launch(c.vm_config(self.instance.id)))

    def _load_snapshot(self, body: object) -> Response:
        p = fields("snapshot load", body, {"snapshot_path": str},
                   {"mem_file_path": str, "mem_backend": dict, "resume_vm": bool,
                    "enable_diff_snapshots": bool, "track_dirty_pages": bool, "network_overrides": list,
                    "vsock_override": dict, "clock_realtime": bool, "huge_pages": str})
        if ("mem_file_path" in p) == ("mem_backend" in p):
            raise FirecrackerError("Load snapshot error: give exactly one of mem_file_path and mem_backend.")
        memory = p.get("mem_file_path")
        if "mem_backend" in p:
            b = fields("mem_backend", p["mem_backend"], {"backend_type": str, "backend_path": str}, {})
            if b["backend_type"] == "Uffd":
                raise not_supported("userfaultfd memory backend (backend_type Uffd); use File")
            if b["backend_type"] != "File":
                raise FirecrackerError(f"{DESERIALIZE}: unknown variant `{b['backend_type']}`, "
                                       "expected `File` or `Uffd`.")
            memory = b["backend_path"]
        assert memory is not None
        if p.get("clock_realtime"):
            raise not_supported("clock_realtime: a restored guest's clock continues from the snapshot")
        if p.get("huge_pages", "Snapshot") not in ("Snapshot", "None"):
            raise not_supported(f"huge pages (huge_pages {p['huge_pages']!r})")
        nets = {}
        for item in p.get("network_overrides", []):
            o = fields("network_overrides", item, {"iface_id": str, "host_dev_name": str}, {})
            nets[o["iface_id"]] = o["host_dev_name"]
        vsock_path = None
        if "vsock_override" in p:
            vsock_path = fields("vsock_override", p["vsock_override"], {"uds_path": str}, {})["uds_path"]
        files = snapfile.SnapshotFiles(p["snapshot_path"], memory)

        def make(c: FirecrackerConfig) -> Launch:
            if not c.is_fresh():
                raise FirecrackerError("Loading a microVM snapshot not allowed after configuring "
                                       "boot-specific resources.")
            try:
                cfg, state = snapshot.read(files)
            except snapfile.SnapshotError as e:
                raise FirecrackerError(f"Load snapshot error: {e}") from e
            for iface_id, tap in nets.items():
                net = next((n for n in cfg.nets if n.id == iface_id), None)
                if net is None:
                    raise FirecrackerError(f"Load snapshot error: network override for {iface_id!r}: the "
                                           "snapshot has no such interface.")
                net.tap = tap
            if vsock_path is not None:
                if cfg.vsock is None:
                    raise FirecrackerError("Load snapshot error: vsock override: the snapshot has no vsock "
                                           "device.")
                cfg.vsock.uds_path = vsock_path
            cfg.name, cfg.serial_stdio, cfg.serial_out_path = self.instance.id, True, c.serial_out_path
            cfg.serial_rate_limiter = c.serial_rate_limiter
            c.restored_from(cfg)
            return Launch(cfg, snapshot.SavedVm(state, files, resume=p.get("resume_vm", False)))
        began = time.monotonic()
        self.instance.launch(make)
        self._vmm_took("load_snapshot", began)
        return Response(204)

    # --- after the start ---
    def _info(self) -> dict[str, Any]:
        return {"id": self.instance.id, "state": self.instance.state, "vmm_version": __version__,
                "app_name": APP_NAME}

    def _export(self) -> dict[str, Any]:
        out = self.instance.config.export()
        if self.instance.restored:
            out.pop("boot-source", None)
        return out

    def _action(self, request: Request, found: Route) -> Response:
        a = fields("action", _json(request), {"action_type": str}, {})
        kind = a["action_type"]
        if kind == "InstanceStart":
            self._start()
        elif kind == "SendCtrlAltDel":
            self.instance.running().request(CtrlAltDel())
        elif kind == "FlushMetrics":
            self.metrics.flush(self.instance.state)
        else:
            raise FirecrackerError(f"{DESERIALIZE}: unknown variant `{kind}`, expected one of "
                                   "`FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`.")
        return Response(204)

    def _patch_vm(self, request: Request, found: Route) -> Response:
        v = fields("vm", _json(request), {"state": str}, {})
        actions: dict[str, Pause | Resume] = {"Paused": Pause(), "Resumed": Resume()}
        if v["state"] not in actions:
            raise FirecrackerError(f"{DESERIALIZE}: unknown variant `{v['state']}`, expected `Paused` or "
                                   "`Resumed`.")
        machine = self.instance.running()
        began = time.monotonic()
        try:
            machine.request(actions[v["state"]])
        except AltoVirtError as e:
            raise FirecrackerError(f"{'Pause' if v['state'] == 'Paused' else 'Resume'} error: {e}") from e
        self._vmm_took("pause_vm" if v["state"] == "Paused" else "resume_vm", began)
        return Response(204)

    def _patch_drive(self, request: Request, found: Route) -> Response:
        d = fields("drive", _json(request), {"drive_id": str}, {"path_on_host": str, "rate_limiter": dict})
        drive_id = found.id
        if d["drive_id"] != drive_id:
            raise FirecrackerError("The id from the path does not match the id from the body!")
        patch = rate_limiter_patch("rate_limiter", d["rate_limiter"]) if "rate_limiter" in d else None
        machine = self.instance.running()
        drive = self.instance.config.drives.get(drive_id)
        if drive is None:
            raise FirecrackerError(f"{DRIVE_ERROR}Unable to patch the block device: there is no drive "
                                   f"{drive_id}. Please verify the request arguments.")
        if "path_on_host" in d:
            try:
                machine.request(ChangeImage(drive_id, d["path_on_host"]))
            except HotplugError as e:
                raise FirecrackerError(f"{DRIVE_ERROR}{e}") from e
        if patch:
            settings = dataclasses.replace(drive.drive.rate_limiter or RateLimiterConfig(), **patch)
            machine.request(SetRateLimiter(drive_id, "rate_limiter", settings))
        return Response(204)

    def _patch_net(self, request: Request, found: Route) -> Response:
        n = fields("network-interface", _json(request), {"iface_id": str},
                   {"rx_rate_limiter": dict, "tx_rate_limiter": dict})
        iface_id = found.id
        if n["iface_id"] != iface_id:
            raise FirecrackerError(f"The id from the path [{iface_id}] does not match the id from the body "
                                   f"[{n['iface_id']}]!")
        patches = {key: rate_limiter_patch(key, n[key]) for key in ("rx_rate_limiter", "tx_rate_limiter")
                   if key in n}
        machine = self.instance.running()
        net = self.instance.config.nets.get(iface_id)
        if net is None:
            raise FirecrackerError(f"Invalid interface ID - not found: {iface_id}.")
        for key, patch in patches.items():
            if patch:
                settings = dataclasses.replace(getattr(net, key) or RateLimiterConfig(), **patch)
                machine.request(SetRateLimiter(iface_id, key, settings))
        return Response(204)

    def _create_snapshot(self, body: object) -> Response:
        p = fields("snapshot create", body, {"snapshot_path": str, "mem_file_path": str},
                   {"snapshot_type": str, "version": str})
        if p.get("snapshot_type", "Full") == "Diff":
            raise not_supported("diff snapshots (snapshot_type Diff); take a Full one")
        if p.get("snapshot_type", "Full") != "Full":
            raise FirecrackerError(f"{DESERIALIZE}: unknown variant `{p['snapshot_type']}`, "
                                   "expected `Full` or `Diff`.")
        machine = self.instance.running()
        if machine.state != RunState.PAUSED:
            raise FirecrackerError("Create snapshot error: the microVM must be paused first "
                                   "(PATCH /vm Paused).")
        done, began = threading.Event(), time.monotonic()
        try:
            machine.request(Migrate(MigrationUri("file", path=p["snapshot_path"], memory=p["mem_file_path"]),
                                    done.set))
        except AltoVirtError as e:
            raise FirecrackerError(f"Create snapshot error: {e}") from e
        done.wait()
        info = cast(dict[str, Any], machine.request(QueryMigration()))
        if info["status"] != "completed":
            raise FirecrackerError(f"Create snapshot error: {info.get('error-desc', info['status'])}")
        self._vmm_took("full_create_snapshot", began)
        return Response(204)

    def _fork(self, body: object) -> Response:
        """AltoVirt's PUT /snapshot/fork (vmm/fork.py): the running or paused VM copied into a
        new ``altovirt-firecracker`` process, which serves its API on ``api_sock``; its
        devices named as snapshot/load's overrides name them. 200 with the child's pid
        once its VM runs."""
        p = fields("snapshot fork", body, {"api_sock": str},
                   {"drive_overrides": list, "network_overrides": list, "vsock_override": dict,
                    "serial_out_path": str, "log_path": str, "qmp_sock": str, "xenstore_sock": str})
        drives = tuple(_pair("drive_overrides", item, "drive_id", "path_on_host")
                       for item in p.get("drive_overrides", []))
        nets = tuple(_pair("network_overrides", item, "iface_id", "host_dev_name")
                     for item in p.get("network_overrides", []))
        vsock = None
        if "vsock_override" in p:
            vsock = fields("vsock_override", p["vsock_override"], {"uds_path": str}, {})["uds_path"]
        machine = self.instance.running()
        from ..vmm.fork import Overrides, read_report  # only once a VM forks
        overrides = Overrides(api_channel=p.get("qmp_sock"), api_sock=p["api_sock"], drives=drives, nets=nets,
                              vsock=vsock, serial_out=p.get("serial_out_path"), log_file=p.get("log_path"),
                              xenstore=p.get("xenstore_sock"))
        try:
            return Response(200, {"pid": read_report(cast(int, machine.request(ForkVm(overrides))))})
        except AltoVirtError as e:
            raise FirecrackerError(f"Fork microVM error: {e}") from e


def _pair(name: str, item: object, key: str, value: str) -> tuple[str, str]:
    """An override's (id, value), from ``{key: ..., value: ...}``."""
    o = fields(name, item, {key: str, value: str}, {})
    return o[key], o[value]


def _metadata_before(c: FirecrackerConfig, method: str, body: object) -> Response:
    """An MMDS request before the start, on the configuration's document."""
    if method == "GET":
        data = c.mmds.data if c.mmds is not None else None
        return Response(200, data if data is not None else {})
    put_metadata(c, body, patch=method == "PATCH")
    return Response(204)


def put_metadata(c: FirecrackerConfig, data: object, *, patch: bool = False) -> None:
    """MMDS's document before the start: ``data`` in place of it, or merged into it (RFC 7396);
    MmdsLimitExceeded past its limit, FirecrackerError for a PATCH before any PUT."""
    mmds = c.mmds_config()
    if patch:
        if mmds.data is None:
            raise FirecrackerError(f"MMDS error: {NotInitialized()}")
        data = merge_patch(mmds.data, data)
    if len(dumps(data).encode()) > mmds.size_limit:
        raise MmdsLimitExceeded()
    mmds.data = data

