"""The StratoVirt/Firecracker-style JSON configuration file (-config)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from . import cpu_template
from .keys import check_keys
from .model import (
    IO_ENGINES,
    MMDS_ADDRESS,
    MMDS_SIZE_LIMIT,
    MMDS_VERSIONS,
    PCI_MACHINE,
    PHYSICAL_SLOT_MAX,
    VCPUS_MAX,
    VCPUS_MIN,
    VSOCK_MAX_CID,
    VSOCK_MIN_CID,
    XEN_DOMID_MAX,
    XEN_DOMID_MIN,
    BalloonConfig,
    ConfigError,
    ConsoleConfig,
    CpuTemplate,
    CpuTemplateSpec,
    DriveConfig,
    IncomingConfig,
    MmdsConfig,
    NetConfig,
    RateLimiterConfig,
    RngConfig,
    RootPortConfig,
    VmConfig,
    VsockConfig,
)
from .validate import (
    check_id,
    check_mac,
    check_tap,
    link_local,
    parse_acpi,
    parse_bool,
    parse_int,
    parse_migration_uri,
    parse_pci_addr,
    parse_size,
)

SECTIONS = {"boot-source", "machine-config", "drive", "net", "console", "serial", "vsock", "rng",
            "xenstore", "incoming", "mmds", "balloon", "cpu-config"}


def _obj(where: str, value: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    """``value`` as a JSON object with these keys (see :func:`.keys.check_keys`)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    check_keys(where, value, required, optional)
    return value


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _int(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer in [{low}, {high}], got {json.dumps(value)}")
    return parse_int(where, value, low, high)


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a JSON array")
    return value


def _engine(where: str, value: Any) -> str:
    if value not in IO_ENGINES:
        raise ConfigError(f"{where}: expected one of {', '.join(IO_ENGINES)}")
    return str(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false")
    return parse_bool(where, value)


def _cpu_template(where: str, parse: Callable[[Any], CpuTemplateSpec], value: Any) -> CpuTemplateSpec:
    try:
        return parse(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def load(path: str) -> VmConfig:
    """Parse the file at ``path`` into a VmConfig (not yet cross-checked)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"-config: {path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"-config: {path}: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"-config: {path}: not valid JSON ({e})") from e
    return from_dict(doc)


def from_dict(doc: Any) -> VmConfig:
    top = _obj("-config", doc, set(), SECTIONS)
    cfg = VmConfig()
    if "boot-source" in top:
        w = "boot-source"
        bs = _obj(w, top[w], {"kernel_image_path"}, {"boot_args", "initrd_fs_path"})
        cfg.kernel = _str(f"{w}.kernel_image_path", bs["kernel_image_path"])
        if "boot_args" in bs:
            if not isinstance(bs["boot_args"], str):
                raise ConfigError(f"{w}.boot_args: expected a string")
            cfg.cmdline = bs["boot_args"]
        if "initrd_fs_path" in bs:
            cfg.initrd = _str(f"{w}.initrd_fs_path", bs["initrd_fs_path"])
    if "machine-config" in top:
        w = "machine-config"
        mc = _obj(w, top[w], set(),
                  {"name", "vcpu_count", "mem_size", "omit_vm_memory", "acpi", "cpu_template", "machine_type",
                   "pci_slots", "root_ports"})
        if "name" in mc:
            cfg.name = _str(f"{w}.name", mc["name"])
        if "vcpu_count" in mc:
            cfg.vcpus = _int(f"{w}.vcpu_count", mc["vcpu_count"], VCPUS_MIN, VCPUS_MAX)
        if "mem_size" in mc:
            v = mc["mem_size"]
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ConfigError(f"{w}.mem_size: expected bytes (an integer) or a size like \"512M\"")
            cfg.mem_size = v if isinstance(v, int) else parse_size(f"{w}.mem_size", v)
        if "omit_vm_memory" in mc:
            cfg.omit_vm_memory = _bool(f"{w}.omit_vm_memory", mc["omit_vm_memory"])
        if "acpi" in mc:
            cfg.acpi = parse_acpi(f"{w}.acpi", _bool(f"{w}.acpi", mc["acpi"]))
        if "machine_type" in mc:
            kind = mc["machine_type"]
            if kind not in ("microvm", PCI_MACHINE):
                raise ConfigError(f"{w}.machine_type: {kind!r}; accepted: microvm, {PCI_MACHINE} (PCI)")
            cfg.pci = kind == PCI_MACHINE
        if "pci_slots" in mc:
            if not cfg.pci or not isinstance(mc["pci_slots"], dict):
                raise ConfigError(f"{w}.pci_slots: an object of device id -> \"SLOT[.FUNCTION]\", with "
                                  "machine_type q35")
            cfg.pci_slots = {check_id(f"{w}.pci_slots", name):
                             parse_pci_addr(f"{w}.pci_slots.{name}", _str(f"{w}.pci_slots.{name}", at))
                             for name, at in mc["pci_slots"].items()}
        if "root_ports" in mc:
            cfg.root_ports = _root_ports(f"{w}.root_ports", mc["root_ports"], cfg.pci)
        if "cpu_template" in mc:
            cfg.cpu_template = _cpu_template(f"{w}.cpu_template", cpu_template.parse_static,
                                             mc["cpu_template"])
    if "cpu-config" in top:
        if isinstance(cfg.cpu_template, str):
            raise ConfigError("cpu-config: a custom CPU template and machine-config.cpu_template exclude "
                              "each other")
        cfg.cpu_template = _cpu_template("cpu-config", cpu_template.parse, top["cpu-config"])
    for i, d in enumerate(_list("drive", top.get("drive", []))):
        w = f"drive[{i}]"
        d = _obj(w, d, {"drive_id", "path_on_host"},
                 {"direct", "read_only", "serial_num", "io_engine", "rate_limiter"})
        cfg.drives.append(DriveConfig(
            id=check_id(f"{w}.drive_id", _str(f"{w}.drive_id", d["drive_id"])),
            path=_str(f"{w}.path_on_host", d["path_on_host"]),
            read_only=_bool(f"{w}.read_only", d.get("read_only", False)),
            direct=_bool(f"{w}.direct", d.get("direct", True)),
            serial=_str(f"{w}.serial_num", d["serial_num"]) if "serial_num" in d else None,
            io_engine=_engine(f"{w}.io_engine", d.get("io_engine", "Sync")),
            rate_limiter=_limiter(f"{w}.rate_limiter", d.get("rate_limiter"))))
    for i, n in enumerate(_list("net", top.get("net", []))):
        w = f"net[{i}]"
        n = _obj(w, n, {"iface_id", "host_dev_name"}, {"mac", "vhost", "rx_rate_limiter", "tx_rate_limiter"})
        cfg.nets.append(NetConfig(
            id=check_id(f"{w}.iface_id", _str(f"{w}.iface_id", n["iface_id"])),
            tap=check_tap(f"{w}.host_dev_name", _str(f"{w}.host_dev_name", n["host_dev_name"])),
            mac=check_mac(f"{w}.mac", _str(f"{w}.mac", n["mac"])) if "mac" in n else None,
            vhost=_bool(f"{w}.vhost", n.get("vhost", False)),
            rx_rate_limiter=_limiter(f"{w}.rx_rate_limiter", n.get("rx_rate_limiter")),
            tx_rate_limiter=_limiter(f"{w}.tx_rate_limiter", n.get("tx_rate_limiter"))))
    if "console" in top:
        c = _obj("console", top["console"], {"console_id", "socket_path"}, set())
        console_id = _str("console.console_id", c["console_id"])
        cfg.console = ConsoleConfig(check_id("console.console_id", console_id),
                                    _str("console.socket_path", c["socket_path"]))
    if "serial" in top:
        s = _obj("serial", top["serial"], {"stdio"}, set())
        cfg.serial_stdio = _bool("serial.stdio", s["stdio"])
    if "vsock" in top:
        v = _obj("vsock", top["vsock"], {"vsock_id", "guest_cid"}, {"uds_path"})
        cfg.vsock = VsockConfig(check_id("vsock.vsock_id", _str("vsock.vsock_id", v["vsock_id"])),
                                _int("vsock.guest_cid", v["guest_cid"], VSOCK_MIN_CID, VSOCK_MAX_CID),
                                _str("vsock.uds_path", v["uds_path"]) if "uds_path" in v else None)
    if "rng" in top:
        r = _obj("rng", top["rng"], {"rng_id"}, {"max_bytes", "period_ms", "rate_limiter"})
        cfg.rng = RngConfig(
            check_id("rng.rng_id", _str("rng.rng_id", r["rng_id"])),
            _int("rng.max_bytes", r["max_bytes"], 1, 1 << 31) if "max_bytes" in r else None,
            _int("rng.period_ms", r.get("period_ms", 1000), 1, 3_600_000),
            _limiter("rng.rate_limiter", r.get("rate_limiter")))
    if "balloon" in top:
        b = _obj("balloon", top["balloon"], set(),
                 {"amount_mib", "deflate_on_oom", "stats_polling_interval_s", "free_page_reporting",
                  "free_page_hinting"})
        w = "balloon"
        cfg.balloon = BalloonConfig(
            _int(f"{w}.amount_mib", b.get("amount_mib", 0), 0, cfg.mem_size >> 20),
            _bool(f"{w}.deflate_on_oom", b.get("deflate_on_oom", False)),
            _int(f"{w}.stats_polling_interval_s", b.get("stats_polling_interval_s", 0), 0, 0xFFFF),
            _bool(f"{w}.free_page_reporting", b.get("free_page_reporting", False)),
            _bool(f"{w}.free_page_hinting", b.get("free_page_hinting", False)))
    if "mmds" in top:
        m = _obj("mmds", top["mmds"], {"network_interfaces"},
                 {"version", "ipv4_address", "imds_compat", "size_limit", "data"})
        nics = [_str("mmds.network_interfaces[]", n) for n in _list("mmds.network_interfaces",
                                                                     m["network_interfaces"])]
        if m.get("version", "V1") not in MMDS_VERSIONS:
            raise ConfigError(f"mmds.version: expected one of {', '.join(MMDS_VERSIONS)}")
        address = _str("mmds.ipv4_address", m.get("ipv4_address", MMDS_ADDRESS))
        if not link_local(address):
            raise ConfigError(f"mmds.ipv4_address: {address} is not in 169.254.1.0 to 169.254.254.255")
        cfg.mmds = MmdsConfig(nics, m.get("version", "V1"), address,
                              _bool("mmds.imds_compat", m.get("imds_compat", False)),
                              _int("mmds.size_limit", m.get("size_limit", MMDS_SIZE_LIMIT), 1, 1 << 31),
                              m.get("data"))
    if "xenstore" in top:
        x = _obj("xenstore", top["xenstore"], {"socket_path"}, {"domid"})
        cfg.xenstore = _str("xenstore.socket_path", x["socket_path"])
        if "domid" in x:
            cfg.xen_domid = _int("xenstore.domid", x["domid"], XEN_DOMID_MIN, XEN_DOMID_MAX)
    if "incoming" in top:
        w = "incoming"
        inc = _obj(w, top[w], {"uri"}, {"resume", "mem"})
        uri = _str(f"{w}.uri", inc["uri"])
        mem = inc.get("mem", "map")
        if mem not in ("map", "copy"):
            raise ConfigError(f"{w}.mem: expected \"map\" or \"copy\"")
        cfg.incoming = IncomingConfig(None if uri == "defer" else parse_migration_uri(f"{w}.uri", uri),
                                      _bool(f"{w}.resume", inc.get("resume", False)), mem == "map")
    return cfg


def _root_ports(w: str, value: object, pci: bool) -> dict[str, RootPortConfig]:
    """``{"ID": {"slot": N, "port": N, "chassis": N, "device": "DEVICE-ID"}}``: PCIe root ports (their places
    are in pci_slots, or the next free ones), each empty or holding a disk or NIC."""
    if not pci or not isinstance(value, dict):
        raise ConfigError(f"{w}: an object of root port id -> {{\"slot\": N, \"port\": N, \"device\": ID}}, "
                          "with machine_type q35")
    ports: dict[str, RootPortConfig] = {}
    for name, port in value.items():
        where = f"{w}.{check_id(w, name)}"
        port = _obj(where, port, set(), {"slot", "port", "chassis", "device"})
        device = port.get("device")
        slot = port.get("slot", len(ports))
        ports[name] = RootPortConfig(_int(f"{where}.slot", slot, 0, PHYSICAL_SLOT_MAX),
                                     _int(f"{where}.port", port.get("port", 0), 0, 0xFF),
                                     _int(f"{where}.chassis", port.get("chassis", 0), 0, 0xFF),
                                     None if device is None else check_id(f"{where}.device",
                                                                          _str(f"{where}.device", device)))
    return ports


def to_dict(cfg: VmConfig) -> dict[str, Any]:
    """The VM's devices and machine as a -config document (:func:`from_dict` reads it back);
    what only concerns the process (API sockets, logging, -incoming) is left out."""
    doc: dict[str, Any] = {
        "machine-config": {"name": cfg.name, "vcpu_count": cfg.vcpus, "mem_size": cfg.mem_size,
                           "omit_vm_memory": cfg.omit_vm_memory, "acpi": cfg.acpi,
                           **({"machine_type": PCI_MACHINE, "pci_slots": {
                               name: f"{at >> 3:#x}.{at & 7}" for name, at in cfg.pci_slots.items()}}
                              if cfg.pci else {}),
                           **({"root_ports": {name: {"slot": p.slot, "port": p.port, "chassis": p.chassis,
                                                     **({"device": p.device} if p.device else {})}
                                              for name, p in cfg.root_ports.items()}}
                              if cfg.root_ports else {}),
                           **({"cpu_template": cfg.cpu_template}
                              if isinstance(cfg.cpu_template, str) else {})},
        "drive": [{"drive_id": d.id, "path_on_host": d.path, "read_only": d.read_only, "direct": d.direct,
                   **({"serial_num": d.serial} if d.serial else {}),
                   **({"io_engine": d.io_engine} if d.io_engine != "Sync" else {}),
                   **_limiters(rate_limiter=d.rate_limiter)} for d in cfg.drives],
        "net": [{"iface_id": n.id, "host_dev_name": n.tap, "vhost": n.vhost,
                 **({"mac": n.mac} if n.mac else {}),
                 **_limiters(rx_rate_limiter=n.rx_rate_limiter, tx_rate_limiter=n.tx_rate_limiter)}
                for n in cfg.nets],
        "serial": {"stdio": cfg.serial_stdio},
    }
    if cfg.kernel:
        doc["boot-source"] = {"kernel_image_path": cfg.kernel, "boot_args": cfg.cmdline,
                              **({"initrd_fs_path": cfg.initrd} if cfg.initrd else {})}
    if cfg.console:
        doc["console"] = {"console_id": cfg.console.id, "socket_path": cfg.console.socket_path}
    if cfg.vsock:
        doc["vsock"] = {"vsock_id": cfg.vsock.id, "guest_cid": cfg.vsock.guest_cid,
                        **({"uds_path": cfg.vsock.uds_path} if cfg.vsock.uds_path else {})}
    if cfg.rng:
        doc["rng"] = {"rng_id": cfg.rng.id, "period_ms": cfg.rng.period_ms,
                      **({"max_bytes": cfg.rng.max_bytes} if cfg.rng.max_bytes is not None else {}),
                      **_limiters(rate_limiter=cfg.rng.rate_limiter)}
    if cfg.balloon:
        doc["balloon"] = dataclasses.asdict(cfg.balloon)
    if cfg.mmds:
        m = cfg.mmds
        doc["mmds"] = {"network_interfaces": m.network_interfaces, "version": m.version,
                       "ipv4_address": m.ipv4_address, "imds_compat": m.imds_compat,
                       "size_limit": m.size_limit, **({"data": m.data} if m.data is not None else {})}
    if cfg.xenstore:
        doc["xenstore"] = {"socket_path": cfg.xenstore, "domid": cfg.xen_domid}
    if isinstance(cfg.cpu_template, CpuTemplate):
        doc["cpu-config"] = cpu_template.export(cfg.cpu_template)
    return doc


def _limiter(where: str, value: Any) -> RateLimiterConfig | None:
    """A rate limiter in Firecracker's form (its RateLimiter object), or None."""
    if value is None:
        return None
    from .firecracker import rate_limiter  # only for a VM that has one (start-up)
    return rate_limiter(where, value)


def _limiters(**limiters: RateLimiterConfig | None) -> dict[str, Any]:
    """The rate limiters set, in Firecracker's form."""
    set_ = {key: cfg for key, cfg in limiters.items() if cfg is not None}
    if not set_:
        return {}
    from .firecracker import export_rate_limiter
    return {key: export_rate_limiter(cfg) for key, cfg in set_.items()}
