"""Firecracker's configuration objects (its API bodies and ``--config-file``) as AltoVirt's.

The shapes and rules are those of Firecracker's OpenAPI description
(``src/firecracker/swagger/firecracker.yaml``): unknown keys are refused,
``null`` stands for an absent optional value, resource ids hold letters,
digits and ``_``. What AltoVirt does not have (SMT, huge pages, pmem, memory
hot-plug) is refused with a message that says so, never ignored.
:class:`FirecrackerConfig` collects a VM's settings before it starts and
turns them into a :class:`VmConfig`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cpu_template
from .keys import KeyProblem, Problem, Types, find_key_problem
from .model import (
    IO_ENGINES,
    MAX_DRIVES,
    MAX_NICS,
    MEM_MIN,
    MMDS_ADDRESS,
    MMDS_SIZE_LIMIT,
    MMDS_VERSIONS,
    VSOCK_MAX_CID,
    VSOCK_MIN_CID,
    BalloonConfig,
    ConfigError,
    CpuTemplateSpec,
    DriveConfig,
    MiB,
    MmdsConfig,
    NetConfig,
    RateLimiterConfig,
    RngConfig,
    TokenBucketConfig,
    VmConfig,
    VsockConfig,
)
from .validate import check_mac, check_tap, link_local

FC_VCPUS_MAX = 32                       # firecracker.yaml, MachineConfiguration.vcpu_count
DEFAULT_MEM_MIB = 128                   # Firecracker's default machine
_FC_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
DESERIALIZE = "An error occurred when deserializing the json body of a request"
# Sections of Firecracker's configuration that AltoVirt does not have, and how it says so.
UNSUPPORTED = {"pmem": "virtio-pmem", "memory-hotplug": "memory hot-plug"}


class FirecrackerError(ConfigError):
    """A body or setting Firecracker's API answers with 400; the message is its fault_message."""


class MmdsLimitExceeded(FirecrackerError):
    """A document past the MMDS store's limit: Firecracker answers 413."""

    def __init__(self) -> None:
        super().__init__("MMDS limit exceeded error: The MMDS patch request doesn't fit.")


# What Firecracker's VmmActionError puts before a device's errors (src/vmm/src/rpc_interface.rs).
DRIVE_ERROR = "Drive config error: "
NET_ERROR = "Network config error: "
VSOCK_ERROR = "Vsock config error: "
MMDS_CONFIG_ERROR = "MMMDS config error: "          # sic: Firecracker's own spelling


# What Rust's std says of a path with a NUL in it (an io::Error of kind InvalidInput).
NUL_IN_PATH = "file name contained an unexpected NUL byte"


def os_error(e: OSError | ValueError) -> str:
    """An OS error as Rust's std::io::Error prints it, which clients match: "No such file or
    directory (os error 2)"; a path Python refuses (a NUL in it) as Rust's words for it."""
    if isinstance(e, ValueError):
        return NUL_IN_PATH
    if e.errno is None:
        return str(e)
    return f"{os.strerror(e.errno)} (os error {e.errno})"


def _opens(path: str, flags: int, message: str) -> None:
    """Firecracker opens a drive's, kernel's or initrd's file when it is configured: so does this
    (and closes it: the VM opens its own at the start). FirecrackerError, ``message`` with the
    OS error in its ``{}``, if it cannot be opened."""
    try:
        os.close(os.open(path, flags | os.O_CLOEXEC))
    except (OSError, ValueError) as e:
        raise FirecrackerError(message.format(os_error(e))) from e


def _can_bind(path: str) -> None:
    """Firecracker binds a vsock's unix socket when it is configured, so a path that exists or
    whose directory does not fails then: checked here (the VM binds it at the start)."""
    problem: OSError | ValueError | None = None
    if os.path.lexists(path):
        problem = OSError(errno.EADDRINUSE, "")
    else:
        try:
            os.stat(os.path.dirname(path) or ".")
        except (OSError, ValueError) as e:
            problem = e
    if problem is not None:
        raise FirecrackerError(f"{VSOCK_ERROR}Cannot create backend for vsock device: Error binding to "
                               f"the host-side Unix socket: {os_error(problem)}")


def not_supported(what: str) -> FirecrackerError:
    return FirecrackerError(f"The requested operation is not supported: AltoVirt does not support {what}.")


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "an array"}


def field_error(where: str, problem: KeyProblem) -> FirecrackerError:
    """The fault_message for a bad key of the object ``where``: serde's words for an unknown
    or missing field, as Firecracker answers (tools that drive it match them)."""
    if problem.kind is Problem.UNKNOWN:
        accepted = ", ".join(f"`{k}`" for k in problem.accepted)
        return FirecrackerError(f"{DESERIALIZE}: unknown field `{problem.key}` in {where}, "
                                f"expected one of {accepted}.")
    if problem.kind is Problem.MISSING:
        return FirecrackerError(f"{DESERIALIZE}: missing field `{problem.key}` in {where}.")
    names = " or ".join(_TYPE_NAMES[k] for k in problem.expected)
    return FirecrackerError(f"{DESERIALIZE}: {where}.{problem.key} must be {names}.")


def fields(where: str, body: object, required: Mapping[str, Types],
           optional: Mapping[str, Types]) -> dict[str, Any]:
    """``body`` checked as a JSON object with these keys and types, in
    :func:`~.keys.find_key_problem`'s order; ``null`` optional values are dropped.
    FirecrackerError (:func:`field_error`) names the first key that is wrong."""
    if not isinstance(body, dict):
        raise FirecrackerError(f"{DESERIALIZE}: {where} must be a JSON object.")
    # null is an absent optional value (serde's Option), so it is neither checked nor kept.
    out = {key: value for key, value in body.items() if value is not None or key not in optional}
    problem = find_key_problem(out, required, optional)
    if problem is not None:
        raise field_error(where, problem)
    return out


def unsigned(value: int, bits: int, where: str = "") -> int:
    """``value`` if it fits Rust's u``bits``; else serde's words for it (``where`` after them)."""
    if not 0 <= value < 1 << bits:
        raise FirecrackerError(f"{DESERIALIZE}: invalid value: integer `{value}`, expected u{bits}"
                               f"{f' ({where})' if where else ''}.")
    return value


def check_fc_id(where: str, value: str) -> str:
    if not _FC_ID.match(value):
        raise FirecrackerError(f"{where}: API Resource IDs can only contain alphanumeric characters and "
                               "underscores (1 to 64 of them).")
    return value


def rate_limiter_patch(where: str, value: object) -> dict[str, TokenBucketConfig | None]:
    """A rate limiter's body (firecracker.yaml's RateLimiter): the buckets it names, each
    None where its size or refill_time is 0 (Firecracker turns that bucket off)."""
    limiter = fields(where, value, {}, {"bandwidth": dict, "ops": dict})
    return {kind: token_bucket(f"{where}.{kind}", bucket) for kind, bucket in limiter.items()}


def token_bucket(where: str, bucket: dict[str, Any]) -> TokenBucketConfig | None:
    """A TokenBucket's body; None where its size or refill_time is 0 (no bucket)."""
    # TokenBucket takes unknown keys (serde's default for it, unlike RateLimiter).
    known = {k: v for k, v in bucket.items() if k in ("size", "refill_time", "one_time_burst")}
    b = fields(where, known, {"size": int, "refill_time": int}, {"one_time_burst": int})
    for key, number in b.items():
        unsigned(number, 64, f"{where}.{key}")
    return TokenBucketConfig(b["size"], b["refill_time"], b.get("one_time_burst", 0)) \
        if b["size"] and b["refill_time"] else None


def rate_limiter(where: str, value: object) -> RateLimiterConfig | None:
    """A rate limiter's body as configured at a PUT; None for none (absent, null, no buckets)."""
    if value is None:
        return None
    cfg = RateLimiterConfig(**rate_limiter_patch(where, value))
    return cfg if cfg.bandwidth or cfg.ops else None


def export_rate_limiter(cfg: RateLimiterConfig | None) -> dict[str, Any] | None:
    """GET /vm/config's form of a rate limiter (null for none, as Firecracker's)."""
    if cfg is None or not (cfg.bandwidth or cfg.ops):
        return None
    return {kind: None if b is None else {"size": b.size, "one_time_burst": b.one_time_burst or None,
                                          "refill_time": b.refill_time}
            for kind, b in (("bandwidth", cfg.bandwidth), ("ops", cfg.ops))}


@dataclass
class FcDrive:
    drive: DriveConfig
    is_root_device: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"


@dataclass
class LoggerConfig:
    log_path: str | None = None
    level: str = "Info"
    show_level: bool = False
    show_log_origin: bool = False


@dataclass
class MetricsConfig:
    metrics_path: str
    emit_id: bool = False
    properties: dict[str, str] = field(default_factory=dict)


LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


def log_level(text: str) -> str | None:
    """A log level as Firecracker spells it, whatever its case (None if it is none)."""
    return next((level for level in LOG_LEVELS if level.lower() == text.lower()), None)


@dataclass
class FirecrackerConfig:
    """A microVM's settings as Firecracker's API collects them before InstanceStart."""

    kernel: str | None = None
    boot_args: str | None = None
    initrd: str | None = None
    vcpu_count: int = 1
    mem_size_mib: int = DEFAULT_MEM_MIB
    track_dirty_pages: bool = False
    drives: dict[str, FcDrive] = field(default_factory=dict)
    nets: dict[str, NetConfig] = field(default_factory=dict)
    vsock: VsockConfig | None = None
    entropy: RngConfig | None = None
    logger: LoggerConfig | None = None
    metrics: MetricsConfig | None = None
    mmds: MmdsConfig | None = None
    mmds_size_limit: int = MMDS_SIZE_LIMIT          # --mmds-size-limit
    enable_pci: bool = False                        # --enable-pci: the devices on PCI
    balloon: BalloonConfig | None = None
    serial_out_path: str | None = None
    serial_rate_limiter: TokenBucketConfig | None = None
    cpu_template: CpuTemplateSpec = None

    # --- the API's bodies ---
    def put_boot_source(self, body: object) -> None:
        b = fields("boot-source", body, {"kernel_image_path": str}, {"boot_args": str, "initrd_path": str})
        _opens(b["kernel_image_path"], os.O_RDONLY,
               "Boot source error: The kernel file cannot be opened: {}")
        if "initrd_path" in b:
            _opens(b["initrd_path"], os.O_RDONLY, "Boot source error: The initrd file cannot be opened "
                   "due to invalid path or invalid permissions. {}")
        self.kernel = b["kernel_image_path"]
        self.boot_args, self.initrd = b.get("boot_args"), b.get("initrd_path")

    def put_machine_config(self, body: object, *, partial: bool = False) -> None:
        kinds: dict[str, type | tuple[type, ...]] = {"vcpu_count": int, "mem_size_mib": int}
        m = fields("machine-config", body, {} if partial else kinds,
                   {**(kinds if partial else {}), "smt": bool, "track_dirty_pages": bool, "cpu_template": str,
                    "huge_pages": str})
        vcpus = m.get("vcpu_count", self.vcpu_count)
        mem = m.get("mem_size_mib", self.mem_size_mib)
        if not 1 <= vcpus <= FC_VCPUS_MAX:
            raise FirecrackerError(f"The vCPU number is invalid! Accepted range [1, {FC_VCPUS_MAX}], "
                                   f"got {vcpus}.")
        if mem < MEM_MIN // MiB:
            raise FirecrackerError(f"The memory size (MiB) is invalid: {mem}; AltoVirt needs at least "
                                   f"{MEM_MIN // MiB} MiB.")
        if m.get("smt"):
            raise not_supported("SMT (simultaneous multithreading) in its CPU topology")
        if "cpu_template" in m:
            try:
                # The last of a static template and a custom one configured is the VM's.
                self.cpu_template = cpu_template.parse_static(m["cpu_template"])
            except ConfigError as e:
                raise FirecrackerError(f"{DESERIALIZE}: {e}.") from e
        if m.get("huge_pages", "None") != "None":
            raise not_supported(f"huge pages (huge_pages {m['huge_pages']!r})")
        self.vcpu_count, self.mem_size_mib = vcpus, mem
        self.track_dirty_pages = m.get("track_dirty_pages", False if not partial else self.track_dirty_pages)

    def put_cpu_config(self, body: object) -> None:
        """A custom CPU template (Firecracker's CustomCpuTemplate), in place of any other."""
        try:
            self.cpu_template = cpu_template.parse(body)
        except ConfigError as e:
            raise FirecrackerError(f"{DESERIALIZE}: {e}.") from e

    def put_drive(self, path_id: str, body: object) -> None:
        d = fields("drive", body, {"drive_id": str, "is_root_device": bool},
                   {"path_on_host": str, "is_read_only": bool, "partuuid": str, "cache_type": str,
                    "io_engine": str, "rate_limiter": dict, "socket": str})
        drive_id = d["drive_id"]
        if drive_id != path_id:
            raise FirecrackerError("The id from the path does not match the id from the body!")
        if "socket" in d:
            raise not_supported("vhost-user block devices")
        if "path_on_host" not in d:
            raise field_error("drive", KeyProblem(Problem.MISSING, "path_on_host"))
        if d.get("cache_type", "Unsafe") not in ("Unsafe", "Writeback"):
            raise FirecrackerError(f"{DESERIALIZE}: unknown cache_type {d['cache_type']!r}, "
                                   "expected `Unsafe` or `Writeback`.")
        if d.get("io_engine", "Sync") not in IO_ENGINES:
            raise FirecrackerError(f"{DESERIALIZE}: unknown io_engine {d['io_engine']!r}, expected `Sync` or "
                                   "`Async`.")
        limiter = rate_limiter("rate_limiter", d.get("rate_limiter"))
        if d["is_root_device"] and any(x.is_root_device for k, x in self.drives.items() if k != drive_id):
            raise FirecrackerError(f"{DRIVE_ERROR}A root block device already exists!")
        if drive_id not in self.drives and len(self.drives) >= MAX_DRIVES:
            raise FirecrackerError(f"{DRIVE_ERROR}Unable to add drive {drive_id}: AltoVirt attaches at most "
                                   f"{MAX_DRIVES}.")
        path = d["path_on_host"]
        _opens(path, os.O_RDONLY if d.get("is_read_only") else os.O_RDWR,
               f"{DRIVE_ERROR}Unable to create the virtio block device: Virtio backend error: Error "
               f"manipulating the backing file: {{}} {path}")
        self.drives[drive_id] = FcDrive(
            DriveConfig(drive_id, path, read_only=d.get("is_read_only", False), direct=False,
                        io_engine=d.get("io_engine", "Sync"), rate_limiter=limiter),
            d["is_root_device"], d.get("partuuid"), d.get("cache_type", "Unsafe"))

    def put_network_interface(self, path_id: str, body: object) -> None:
        n = fields("network-interface", body, {"iface_id": str, "host_dev_name": str},
                   {"guest_mac": str, "mtu": int, "rx_rate_limiter": dict, "tx_rate_limiter": dict})
        iface_id = n["iface_id"]
        if iface_id != path_id:     # request/net.rs's words, not drive.rs's
            raise FirecrackerError(f"The id from the path [{path_id}] does not match the id from the body "
                                   f"[{iface_id}]!")
        if "mtu" in n:
            raise not_supported("MTU advertisement (VIRTIO_NET_F_MTU)")
        rx = rate_limiter("rx_rate_limiter", n.get("rx_rate_limiter"))
        tx = rate_limiter("tx_rate_limiter", n.get("tx_rate_limiter"))
        tap = check_tap("host_dev_name", n["host_dev_name"])
        mac = check_mac("guest_mac", n["guest_mac"]) if "guest_mac" in n else None
        for other_id, other in self.nets.items():
            if other_id != iface_id and other.tap == tap:
                raise FirecrackerError(f"{NET_ERROR}The host device name {tap} is already in use by "
                                       f"{other_id}.")
            if other_id != iface_id and mac and other.mac == mac:
                raise FirecrackerError(f"{NET_ERROR}The MAC address is already in use: {mac}")
        if iface_id not in self.nets and len(self.nets) >= MAX_NICS:
            raise FirecrackerError(f"{NET_ERROR}Unable to add network interface {iface_id}: AltoVirt "
                                   f"attaches at most {MAX_NICS}.")
        try:
            socket.if_nametoindex(tap)
        except OSError as e:
            # Firecracker (as root) would make a tap that joins nothing; AltoVirt uses existing ones.
            why = os_error(OSError(errno.ENODEV, ""))
            raise FirecrackerError(f"{NET_ERROR}Could not create the network device: Open tap device failed: "
                                   f"Error while creating ifreq structure: {why}. Invalid TUN/TAP "
                                   f"Backend provided by {tap}. Create it first (ip tuntap add dev {tap} "
                                   "mode tap).") from e
        self.nets[iface_id] = NetConfig(iface_id, tap, mac, rx_rate_limiter=rx, tx_rate_limiter=tx)

    def put_vsock(self, body: object) -> None:
        v = fields("vsock", body, {"guest_cid": int, "uds_path": str}, {"vsock_id": str})
        if not VSOCK_MIN_CID <= v["guest_cid"] <= VSOCK_MAX_CID:
            raise FirecrackerError(f"Invalid guest CID {v['guest_cid']}; accepted range "
                                   f"[{VSOCK_MIN_CID}, {VSOCK_MAX_CID}].")
        vsock_id = check_fc_id("vsock_id", v.get("vsock_id", "vsock"))
        _can_bind(v["uds_path"])
        self.vsock = VsockConfig(vsock_id, v["guest_cid"], v["uds_path"])

    def put_entropy(self, body: object) -> None:
        e = fields("entropy", body, {}, {"rate_limiter": dict})
        self.entropy = RngConfig("entropy", rate_limiter=rate_limiter("rate_limiter", e.get("rate_limiter")))

    def put_logger(self, body: object) -> LoggerConfig:
        lg = fields("logger", body, {}, {"log_path": str, "level": str, "show_level": bool,
                                         "show_log_origin": bool, "module": str})
        level = log_level(lg.get("level", "Info"))
        if level is None:
            raise FirecrackerError(f"Invalid log level {lg['level']!r}; accepted: {', '.join(LOG_LEVELS)}.")
        self.logger = LoggerConfig(lg.get("log_path"), level, lg.get("show_level", False),
                                   lg.get("show_log_origin", False))
        return self.logger

    def put_metrics(self, body: object) -> MetricsConfig:
        mt = fields("metrics", body, {"metrics_path": str}, {"emit_id": bool, "properties": dict})
        props = mt.get("properties", {})
        if not all(isinstance(v, str) for v in props.values()):
            raise FirecrackerError(f"{DESERIALIZE}: metrics.properties values must be strings.")
        if self.metrics is not None:
            raise FirecrackerError("Reinitialization of metrics not allowed.")
        self.metrics = MetricsConfig(mt["metrics_path"], mt.get("emit_id", False), props)
        return self.metrics

    def put_serial(self, body: object) -> None:
        """Where the serial console's output goes (a file or named pipe) instead of stdout."""
        sc = fields("serial", body, {}, {"serial_out_path": str, "rate_limiter": dict})
        self.serial_out_path = sc.get("serial_out_path")
        self.serial_rate_limiter = token_bucket("serial.rate_limiter", sc["rate_limiter"]) \
            if "rate_limiter" in sc else None

    def put_balloon(self, body: object) -> None:
        b = fields("balloon", body, {"amount_mib": int, "deflate_on_oom": bool},
                   {"stats_polling_interval_s": int, "free_page_hinting": bool, "free_page_reporting": bool})
        unsigned(b["amount_mib"], 32)
        unsigned(b.get("stats_polling_interval_s", 0), 16)
        if b["amount_mib"] > self.mem_size_mib:
            raise FirecrackerError("Balloon config error: Amount of pages requested is too large.")
        self.balloon = BalloonConfig(b["amount_mib"], b["deflate_on_oom"],
                                     stats_polling_interval_s=b.get("stats_polling_interval_s", 0),
                                     free_page_reporting=b.get("free_page_reporting", False),
                                     free_page_hinting=b.get("free_page_hinting", False))

    def put_mmds_config(self, body: object) -> None:
        m = fields("mmds-config", body, {"network_interfaces": list},
                   {"version": str, "ipv4_address": str, "imds_compat": bool})
        if m.get("version", "V1") not in MMDS_VERSIONS:
            raise FirecrackerError(f"{DESERIALIZE}: unknown variant `{m['version']}`, expected `V1` or `V2`.")
        address = m.get("ipv4_address", MMDS_ADDRESS)
        try:
            valid = link_local(address)
        except ConfigError as e:
            raise FirecrackerError(f"{DESERIALIZE}: invalid IPv4 address syntax.") from e
        if not valid:
            raise FirecrackerError(f"{MMDS_CONFIG_ERROR}The MMDS IPv4 address is not link local.")
        nics = m["network_interfaces"]
        if not all(isinstance(n, str) for n in nics):
            raise FirecrackerError(f"{DESERIALIZE}: mmds-config.network_interfaces must be an array of "
                                   "strings.")
        if not nics:
            raise FirecrackerError(f"{MMDS_CONFIG_ERROR}The list of network interface IDs that allow "
                                   "forwarding MMDS requests is empty.")
        if not all(n in self.nets for n in nics):
            raise FirecrackerError(f"{MMDS_CONFIG_ERROR}The list of network interface IDs provided contains "
                                   "at least one ID that does not correspond to any existing network "
                                   "interface.")
        data = self.mmds.data if self.mmds is not None else None
        self.mmds = MmdsConfig(list(nics), m.get("version", "V1"), address, m.get("imds_compat", False),
                               self.mmds_size_limit, data)

    def mmds_config(self) -> MmdsConfig:
        """MMDS's settings and document, made on first use (a PUT /mmds before any config)."""
        if self.mmds is None:
            self.mmds = MmdsConfig(size_limit=self.mmds_size_limit)
        return self.mmds

    def is_fresh(self) -> bool:
        """Nothing but the logger, metrics and MMDS is configured (what snapshot/load requires)."""
        return dataclasses.replace(self, logger=None, metrics=None, mmds=None, serial_out_path=None,
                                   serial_rate_limiter=None, mmds_size_limit=MMDS_SIZE_LIMIT) \
            == FirecrackerConfig()

    def restored_from(self, cfg: VmConfig) -> None:
        """Take the machine and devices of a VM loaded from a snapshot (for GET /vm/config)."""
        self.kernel, self.boot_args, self.initrd = cfg.kernel, cfg.cmdline, cfg.initrd
        self.vcpu_count, self.mem_size_mib = cfg.vcpus, cfg.mem_size // MiB
        self.drives = {d.id: FcDrive(d) for d in cfg.drives}
        # The root drive is the first, named on the command line as vm_config names it.
        root = re.search(r"(?:^| )root=(/dev/vda|PARTUUID=(\S+)) ", f"{cfg.cmdline} ")
        if root is not None and cfg.drives:
            first = self.drives[cfg.drives[0].id]
            first.is_root_device, first.partuuid = True, root.group(2)
        self.nets = {n.id: n for n in cfg.nets}
        self.vsock = cfg.vsock
        self.entropy = cfg.rng
        self.mmds = cfg.mmds
        self.balloon = cfg.balloon
        self.cpu_template = cfg.cpu_template

    # --- whole documents ---
    def load_document(self, doc: object) -> None:
        """Firecracker's ``--config-file`` document."""
        if not isinstance(doc, dict):
            raise FirecrackerError("the configuration file must hold a JSON object")
        # MMDS's section names NICs: it goes after theirs, wherever it is in the document.
        for key, value in sorted(doc.items(), key=lambda item: item[0] == "mmds-config"):
            if value is None:
                continue
            if key in UNSUPPORTED:
                raise not_supported(UNSUPPORTED[key])
            put = {"boot-source": self.put_boot_source, "machine-config": self.put_machine_config,
                   "vsock": self.put_vsock, "entropy": self.put_entropy, "logger": self.put_logger,
                   "metrics": self.put_metrics, "mmds-config": self.put_mmds_config,
                   "balloon": self.put_balloon, "serial": self.put_serial,
                   "cpu-config": self._cpu_config_section}.get(key)
            if put is not None:
                put(value)
            elif key in ("drives", "network-interfaces"):
                if not isinstance(value, list):
                    raise FirecrackerError(f"{DESERIALIZE}: {key} must be an array.")
                id_key = "drive_id" if key == "drives" else "iface_id"
                for item in value:
                    ident = item.get(id_key) if isinstance(item, dict) else None
                    if not isinstance(ident, str):
                        raise FirecrackerError(f"{DESERIALIZE}: every entry of {key} needs its id.")
                    (self.put_drive if key == "drives" else self.put_network_interface)(ident, item)
            else:
                accepted = ", ".join(sorted({"boot-source", "machine-config", "drives", "network-interfaces",
                                             "vsock", "entropy", "logger", "metrics", "mmds-config",
                                             "balloon", "serial", "cpu-config", *UNSUPPORTED}))
                raise FirecrackerError(f"unknown configuration section {key!r}; accepted: {accepted}")

    def _cpu_config_section(self, value: object) -> None:
        """``cpu-config``: a custom CPU template, or the path of a file that holds one."""
        if isinstance(value, str):
            try:
                with open(value, encoding="utf-8") as f:
                    value = json.load(f)
            except (OSError, ValueError, RecursionError) as e:
                why = os_error(e) if isinstance(e, OSError) else f"not valid JSON ({e})"
                raise FirecrackerError(f"cpu-config: {value}: {why}") from e
        self.put_cpu_config(value)

    def export(self) -> dict[str, Any]:
        """GET /vm/config's FullVmConfiguration."""
        out: dict[str, Any] = {
            "machine-config": {"vcpu_count": self.vcpu_count, "mem_size_mib": self.mem_size_mib, "smt": False,
                               "track_dirty_pages": self.track_dirty_pages, "huge_pages": "None",
                               **({"cpu_template": self.cpu_template}
                                  if isinstance(self.cpu_template, str) else {})},
            "drives": [{"drive_id": k, "partuuid": d.partuuid, "is_root_device": d.is_root_device,
                        "cache_type": d.cache_type, "is_read_only": d.drive.read_only,
                        "path_on_host": d.drive.path, "io_engine": d.drive.io_engine,
                        "rate_limiter": export_rate_limiter(d.drive.rate_limiter),
                        "socket": None} for k, d in self.drives.items()],
            "network-interfaces": [{"iface_id": k, "host_dev_name": n.tap, "guest_mac": n.mac,
                                    "rx_rate_limiter": export_rate_limiter(n.rx_rate_limiter),
                                    "tx_rate_limiter": export_rate_limiter(n.tx_rate_limiter)}
                                   for k, n in self.nets.items()],
            "balloon": None if self.balloon is None else export_balloon(self.balloon), "vsock": None,
            "entropy": None if self.entropy is None else
            {"rate_limiter": export_rate_limiter(self.entropy.rate_limiter)},
            "logger": None, "metrics": None, "mmds-config": None,
        }
        if self.mmds is not None and self.mmds.network_interfaces:
            m = self.mmds
            out["mmds-config"] = {"version": m.version, "network_interfaces": m.network_interfaces,
                                  "ipv4_address": m.ipv4_address, "imds_compat": m.imds_compat}
        if self.kernel is not None:
            out["boot-source"] = {"kernel_image_path": self.kernel, "boot_args": self.boot_args,
                                  "initrd_path": self.initrd}
        if self.vsock is not None:
            out["vsock"] = {"guest_cid": self.vsock.guest_cid, "uds_path": self.vsock.uds_path}
        if self.logger is not None:
            out["logger"] = dataclasses.asdict(self.logger)
        if self.metrics is not None:
            out["metrics"] = dataclasses.asdict(self.metrics)
        return out

    def vm_config(self, name: str) -> VmConfig:
        """The VmConfig to build; the root drive first (it is /dev/vda) and named on the kernel
        command line, as Firecracker does. Its device entries are this configuration's own,
        so what the running VM changes (PATCH /drives) shows in :meth:`export`."""
        if self.kernel is None:
            raise FirecrackerError("Cannot start microvm without kernel configuration.")
        drives = sorted(self.drives.values(), key=lambda d: not d.is_root_device)
        cmdline = self.boot_args if self.boot_args is not None else DEFAULT_BOOT_ARGS
        root = next((d for d in drives if d.is_root_device), None)
        if root is not None:
            dev = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
            cmdline = f"{cmdline} root={dev} {'ro' if root.drive.read_only else 'rw'}"
        return VmConfig(kernel=self.kernel, cmdline=cmdline, initrd=self.initrd, name=name,
                        vcpus=self.vcpu_count, mem_size=self.mem_size_mib * MiB,
                        drives=[d.drive for d in drives], nets=list(self.nets.values()), vsock=self.vsock,
                        rng=self.entropy, mmds=self.mmds, balloon=self.balloon, serial_stdio=True,
                        serial_out_path=self.serial_out_path, serial_rate_limiter=self.serial_rate_limiter,
                        cpu_template=self.cpu_template, pci=self.enable_pci)


def export_balloon(b: BalloonConfig) -> dict[str, Any]:
    """GET /balloon's (and /vm/config's) form of the balloon's settings."""
    return {"amount_mib": b.amount_mib, "deflate_on_oom": b.deflate_on_oom,
            "stats_polling_interval_s": b.stats_polling_interval_s, "free_page_hinting": b.free_page_hinting,
            "free_page_reporting": b.free_page_reporting}


# Firecracker's default kernel command line (src/vmm/src/vmm_config/boot_source.rs).
DEFAULT_BOOT_ARGS = ("reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd "
                     "swiotlb=noforce")

