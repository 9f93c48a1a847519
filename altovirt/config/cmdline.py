"""The StratoVirt-style command line: ``altovirt -OPTION VALUE ...``.

Options take one dash (QEMU style); the ``--`` spelling is accepted too.
``-config FILE`` is read first wherever it appears, and every other option
then overrides or adds to what the file says (a device with the id of one in
the file replaces it).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import AltoVirtError
from . import jsonconfig
from .model import (
    VCPUS_MAX,
    VCPUS_MIN,
    VSOCK_MAX_CID,
    VSOCK_MIN_CID,
    XEN_DOMID_MAX,
    XEN_DOMID_MIN,
    ConfigError,
    ConsoleConfig,
    DriveConfig,
    IncomingConfig,
    NetConfig,
    RngConfig,
    VmConfig,
    VsockConfig,
)
from .validate import (
    check_api_channel,
    check_id,
    check_mac,
    check_tap,
    parse_bool,
    parse_int,
    parse_migration_uri,
    parse_size,
)

USAGE = """\
usage: altovirt -kernel PATH [-append CMDLINE] [-initrd PATH] [-smp [cpus=]N] [-m SIZE]
                [-drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,serial=S]]...
                [-netdev id=ID,netdev=TAP[,mac=MAC][,vhost=on|off]]... [-chardev id=ID,path=SOCKET]
                [-device vsock,id=ID,guest-cid=N[,uds-path=SOCKET]]
                [-device virtio-rng[,id=ID,max-bytes=N,period=MS]]
                [-api-channel unix:PATH | -qmp unix:PATH,server,nowait] [-serial stdio]
                [-xenstore SOCKET [-xen-domid N]] [-machine [microvm][,acpi=on|off]]
                [-name NAME] [-D LOGFILE] [-daemonize [-pidfile PATH]] [-disable-seccomp]
                [-omit_vm_memory] [-config FILE.json] [-debug] [-version]
                [-incoming file:DIR|tcp:HOST:PORT|unix:PATH|defer[,resume=on][,mem=map|copy]]

Boots a micro-VM on KVM. Sizes take bytes or a K/M/G suffix; -smp in [1, 254],
-m in [128M, 512G]. Exit status: 0 the guest powered off or reset, 1 VMM or KVM
error, 2 usage or configuration error, 3 guest panic, 128+N stopped by signal N.
"""

VALUE_OPTIONS = {"name", "machine", "kernel", "append", "initrd", "smp", "m", "drive", "netdev", "chardev",
                 "device", "api-channel", "qmp", "serial", "D", "pidfile", "config",
                 "xenstore", "xen-domid", "incoming"}
FLAG_OPTIONS = {"disable-seccomp", "omit_vm_memory", "daemonize", "debug", "help", "h", "version"}


class HelpRequested(AltoVirtError):
    """-help or -version: not an error; the message is printed and the VMM exits 0."""

    exit_status = 0


def split_kv(where: str, text: str, positional: str | None = None) -> dict[str, str]:
    """``a=1,b=2`` (",," is a literal comma); a leading bare word is ``positional``."""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    out: dict[str, str] = {}
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and positional and key:
                key, value = positional, item
            else:
                raise ConfigError(f"{where}: expected key=value, got {item!r}")
        if key in out:
            raise ConfigError(f"{where}: {key!r} given twice")
        out[key] = value
    return out


def _keys(where: str, kv: dict[str, str], required: set[str], optional: set[str]) -> None:
    unknown = set(kv) - required - optional
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; accepted: "
                          f"{', '.join(sorted(required | optional))}")
    missing = required - set(kv)
    if missing:
        raise ConfigError(f"{where}: missing {sorted(missing)[0]}=")


def _replace(items: list, new: object) -> None:
    """Add a device, replacing one with the same id (from -config)."""
    for i, old in enumerate(items):
        if old.id == new.id:  # type: ignore[attr-defined]
            items[i] = new
            return
    items.append(new)


def _smp(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-smp", v, positional="cpus")
    _keys("-smp", kv, {"cpus"}, set())
    cfg.vcpus = parse_int("-smp", kv["cpus"], VCPUS_MIN, VCPUS_MAX)


def _drive(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-drive", v)
    _keys("-drive", kv, {"id", "file"}, {"readonly", "direct", "serial"})
    if not kv["file"]:
        raise ConfigError("-drive: file= is empty")
    _replace(cfg.drives, DriveConfig(
        id=check_id("-drive id", kv["id"]), path=kv["file"],
        read_only=parse_bool("-drive readonly", kv.get("readonly", "off")),
        direct=parse_bool("-drive direct", kv.get("direct", "on")),
        serial=kv.get("serial") or None))


def _netdev(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-netdev", v)
    _keys("-netdev", kv, {"id", "netdev"}, {"mac", "vhost"})
    _replace(cfg.nets, NetConfig(
        id=check_id("-netdev id", kv["id"]), tap=check_tap("-netdev netdev", kv["netdev"]),
        mac=check_mac("-netdev mac", kv["mac"]) if "mac" in kv else None,
        vhost=parse_bool("-netdev vhost", kv.get("vhost", "off"))))


def _chardev(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-chardev", v)
    _keys("-chardev", kv, {"id", "path"}, set())
    if cfg.console is not None and cfg.console.id != kv["id"]:
        raise ConfigError("-chardev: only one console is supported")
    cfg.console = ConsoleConfig(check_id("-chardev id", kv["id"]), kv["path"])


def _device(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-device", v, positional="driver")
    driver = kv.get("driver")
    if driver in ("virtio-rng", "virtio-rng-device"):
        _rng(cfg, kv)
        return
    if driver != "vsock":
        raise ConfigError(f"-device: unknown device {driver!r}; accepted: vsock, virtio-rng")
    _keys("-device vsock", kv, {"driver", "id", "guest-cid"}, {"uds-path"})
    if cfg.vsock is not None and cfg.vsock.id != kv["id"]:
        raise ConfigError("-device vsock: only one vsock device is supported")
    cfg.vsock = VsockConfig(check_id("-device vsock id", kv["id"]),
                            parse_int("-device vsock guest-cid", kv["guest-cid"], VSOCK_MIN_CID,
                                      VSOCK_MAX_CID), kv.get("uds-path") or None)


def _rng(cfg: VmConfig, kv: dict[str, str]) -> None:
    where = "-device virtio-rng"
    _keys(where, kv, {"driver"}, {"id", "max-bytes", "period"})
    rng_id = check_id(f"{where} id", kv.get("id", "rng0"))
    if cfg.rng is not None and cfg.rng.id != rng_id:
        raise ConfigError(f"{where}: only one entropy device is supported")
    max_bytes = parse_int(f"{where} max-bytes", kv["max-bytes"], 1, 1 << 31) if "max-bytes" in kv else None
    period = parse_int(f"{where} period", kv.get("period", "1000"), 1, 3_600_000)
    cfg.rng = RngConfig(rng_id, max_bytes, period)


def _machine(cfg: VmConfig, v: str) -> None:
    """QEMU's spelling: -machine [type=]microvm,acpi=on|off (microvm is the only type)."""
    kv = split_kv("-machine", v, positional="type")
    _keys("-machine", kv, set(), {"type", "acpi"})
    if kv.get("type", "microvm") != "microvm":
        raise ConfigError(f"-machine: unknown machine type {kv['type']!r}; accepted: microvm")
    if "acpi" in kv:
        cfg.acpi = parse_bool("-machine acpi", kv["acpi"])


def _incoming(cfg: VmConfig, v: str) -> None:
    """-incoming URI|defer[,resume=on|off][,mem=map|copy] (",," for a comma in the URI)."""
    kv = split_kv("-incoming", v, positional="uri")
    _keys("-incoming", kv, {"uri"}, {"resume", "mem"})
    if kv.get("mem", "map") not in ("map", "copy"):
        raise ConfigError(f"-incoming: mem={kv['mem']!r}; accepted: map (the snapshot's file, "
                          "copy-on-write) or copy (read into RAM)")
    uri = None if kv["uri"] == "defer" else parse_migration_uri("-incoming", kv["uri"])
    cfg.incoming = IncomingConfig(uri, parse_bool("-incoming resume", kv.get("resume", "off")),
                                  kv.get("mem", "map") == "map")


def _serial(cfg: VmConfig, v: str) -> None:
    if v not in ("stdio", "none"):
        raise ConfigError(f"-serial: unsupported backend {v!r}; accepted: stdio, none")
    cfg.serial_stdio = v == "stdio"


def _set(attr: str) -> Callable[[VmConfig, str], None]:
    def setter(cfg: VmConfig, v: str) -> None:
        setattr(cfg, attr, v)
    return setter


def _api_channel(cfg: VmConfig, v: str) -> None:
    cfg.api_channel = check_api_channel("-api-channel", v)


def _qmp(cfg: VmConfig, v: str) -> None:
    """QEMU's and later StratoVirt's spelling: -qmp unix:PATH,server,nowait (or server=on,wait=off)."""
    path, *opts = v.split(",")
    for opt in opts:
        if opt not in ("server", "nowait", "server=on", "wait=off"):
            raise ConfigError(f"-qmp: unsupported option {opt!r}; accepted: unix:PATH,server,nowait")
    cfg.api_channel = check_api_channel("-qmp", path)


HANDLERS: dict[str, Callable[[VmConfig, str], None]] = {
    "name": _set("name"), "machine": _machine, "kernel": _set("kernel"), "append": _set("cmdline"),
    "initrd": _set("initrd"), "D": _set("log_file"), "pidfile": _set("pidfile"),
    "smp": _smp, "m": lambda cfg, v: setattr(cfg, "mem_size", parse_size("-m", v)),
    "drive": _drive, "netdev": _netdev, "chardev": _chardev, "device": _device,
    "serial": _serial, "incoming": _incoming, "api-channel": _api_channel, "qmp": _qmp,
    "xenstore": _set("xenstore"),
    "xen-domid": lambda cfg, v: setattr(cfg, "xen_domid", parse_int("-xen-domid", v, XEN_DOMID_MIN,
                                                                      XEN_DOMID_MAX)),
}
FLAGS = {"disable-seccomp": ("seccomp", False), "omit_vm_memory": ("omit_vm_memory", True),
         "daemonize": ("daemonize", True), "debug": ("debug", True)}


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    opts: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ConfigError(f"unexpected argument {arg!r}; options start with '-' "
                              "(run 'altovirt -help')")
        name = arg.lstrip("-")
        name, eq, inline = name.partition("=")
        if name in FLAG_OPTIONS:
            if eq:
                raise ConfigError(f"-{name}: takes no value")
            opts.append((name, None))
        elif name in VALUE_OPTIONS:
            if eq:
                opts.append((name, inline))
            elif i + 1 < len(argv):
                i += 1
                opts.append((name, argv[i]))
            else:
                raise ConfigError(f"-{name}: missing value")
        else:
            raise ConfigError(f"unknown option {arg!r}; run 'altovirt -help' for the options")
        i += 1
    return opts


def parse(argv: list[str]) -> VmConfig:
    """Parse argv (without the program name) into a VmConfig (not yet cross-checked)."""
    opts = _split(argv)
    names = [n for n, _ in opts]
    if "help" in names or "h" in names:
        raise HelpRequested(USAGE)
    if "version" in names:
        from .. import __version__
        raise HelpRequested(f"altovirt {__version__}\n")
    configs = [v for n, v in opts if n == "config" and v is not None]
    if len(configs) > 1:
        raise ConfigError("-config: given more than once")
    cfg = jsonconfig.load(configs[0]) if configs else VmConfig()
    for name, value in opts:
        if name == "config":
            continue
        if name in FLAGS:
            attr, flag = FLAGS[name]
            setattr(cfg, attr, flag)
        else:
            assert value is not None
            HANDLERS[name](cfg, value)
    return cfg
