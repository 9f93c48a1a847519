"""Devices on the command line: StratoVirt 2.x's backends and the devices that use them.

In StratoVirt 2.x's syntax (QEMU's), a device is two options: a backend named by
its id (``-drive``, ``-netdev tap,``, ``-chardev socket,``, ``-object rng-random,``)
and a ``-device`` that uses it (``drive=``, ``netdev=``, ``chardev=``, ``rng=``).
They may come in any order (Kata puts a console's ``-device`` before its
``-chardev``), so :class:`Devices` collects them and pairs them once the whole
command line is read. The 2020 forms stay as they were: a ``-drive`` that no
device uses is a disk by itself, ``-netdev id=,netdev=TAP`` is a NIC and
``-chardev id=,path=`` the console. A 2.x backend that no device uses is an
error, as is a device whose backend is missing: nothing is dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .keys import check_keys
from .model import (
    PHYSICAL_SLOT_MAX,
    VSOCK_MAX_CID,
    VSOCK_MIN_CID,
    BalloonConfig,
    ConfigError,
    ConsoleConfig,
    DriveConfig,
    FsConfig,
    NetConfig,
    RateLimiterConfig,
    RngConfig,
    RootPortConfig,
    TokenBucketConfig,
    VmConfig,
    VsockConfig,
)
from .validate import check_id, check_mac, check_tap, parse_bool, parse_int, parse_pci_addr

ROOT_PORT = "pcie-root-port"
# Entropy files served by getrandom(2), which reads the same pool (Linux >= 5.6).
RNG_FILES = ("/dev/urandom", "/dev/random")
TAG_MAX = 36                    # virtio-fs: the tag's bytes in the configuration space (virtio 1.2, 5.11.4)
# What an aio= may say: io_uring (QEMU's name) or iouring (StratoVirt's) is a disk's own ring
# (io_engine Async); the others are served by AltoVirt's block workers alike.
AIO_MODES = ("native", "io_uring", "iouring", "threads", "off")
AIO_RING = ("io_uring", "iouring")


def split_kv(where: str, text: str, positional: str | None = None,
             flags: frozenset[str] = frozenset()) -> dict[str, str]:
    """``a=1,b=2`` (",," is a literal comma). A leading bare word is ``positional``; a later
    bare word must be one of ``flags`` and means ``flag=on`` (``readonly``, ``server``)."""
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
            elif key in flags:
                value = "on"
            else:
                raise ConfigError(f"{where}: expected key=value, got {item!r}")
        if key in out:
            raise ConfigError(f"{where}: {key!r} given twice")
        out[key] = value
    return out


def replace(items: list, new: object) -> None:
    """Add a device, replacing one with the same id (from -config)."""
    for i, old in enumerate(items):
        if old.id == new.id:  # type: ignore[attr-defined]
            items[i] = new
            return
    items.append(new)


def _fd(where: str, text: str) -> int:
    """A file descriptor this process inherited, by number."""
    fd = parse_int(where, text, 3, 1 << 20)
    try:
        os.fstat(fd)
    except OSError as e:
        raise ConfigError(f"{where}: file descriptor {fd} is not open in the VMM ({e.strerror}); "
                          "pass it to the process") from e
    return fd


class Devices:
    """The command line's backends and devices, paired by :meth:`apply`."""

    def __init__(self) -> None:
        self.drives: dict[str, dict[str, str]] = {}
        self.netdevs: dict[str, dict[str, str]] = {}       # 2.x tap netdevs
        self.chardevs: dict[str, dict[str, str]] = {}      # 2.x socket chardevs
        self.rngs: dict[str, str] = {}                     # rng-random id -> filename
        self.devices: list[dict[str, str]] = []
        self.monitors: list[dict[str, str]] = []
        self._legacy: list[Callable[[VmConfig], None]] = []   # 2020 NICs and console, in order

    # --- collecting, option by option ---
    def drive(self, v: str) -> None:
        kv = split_kv("-drive", v, flags=frozenset({"readonly", "direct"}))
        check_keys("-drive", kv, {"id", "file"},
                   {"readonly", "direct", "serial", "if", "format", "aio", "throttling.iops-total"})
        where = f"-drive id={kv['id']}"
        check_id("-drive id", kv["id"])
        if not kv["file"]:
            raise ConfigError(f"{where}: file= is empty")
        if kv.get("if", "none") != "none":
            raise ConfigError(f"{where}: if={kv['if']!r}; accepted: none (a -device virtio-blk-device "
                              "makes the disk)")
        if kv.get("format", "raw") != "raw":
            raise ConfigError(f"{where}: format={kv['format']!r}; accepted: raw")
        if kv.get("aio", "off") not in AIO_MODES:
            raise ConfigError(f"{where}: aio={kv['aio']!r}; accepted: {', '.join(AIO_MODES)}")
        self._add(self.drives, "-drive", kv)

    def netdev(self, v: str) -> None:
        kv = split_kv("-netdev", v, positional="type")
        if "type" not in kv:            # the 2020 form: a NIC by itself
            check_keys("-netdev", kv, {"id", "netdev"}, {"mac", "vhost"})
            self._legacy.append(lambda cfg: replace(cfg.nets, NetConfig(
                id=check_id("-netdev id", kv["id"]), tap=check_tap("-netdev netdev", kv["netdev"]),
                mac=check_mac("-netdev mac", kv["mac"]) if "mac" in kv else None,
                vhost=parse_bool("-netdev vhost", kv.get("vhost", "off")))))
            return
        if kv["type"] != "tap":
            raise ConfigError(f"-netdev: type {kv['type']!r}; accepted: tap "
                              "(or the 2020 form id=ID,netdev=TAP)")
        check_keys("-netdev tap", kv, {"type", "id"}, {"ifname", "fd", "fds", "vhost", "vhostfd", "queues"})
        check_id("-netdev id", kv["id"])
        self._add(self.netdevs, "-netdev", kv)

    def chardev(self, v: str) -> None:
        kv = split_kv("-chardev", v, positional="backend", flags=frozenset({"server", "nowait"}))
        if "backend" not in kv:         # the 2020 form: the console
            check_keys("-chardev", kv, {"id", "path"}, set())
            self._legacy.append(lambda cfg: _console(cfg, "-chardev", kv["id"], kv["path"]))
            return
        if kv["backend"] != "socket":
            raise ConfigError(f"-chardev: backend {kv['backend']!r}; accepted: socket")
        check_keys("-chardev socket", kv, {"backend", "id", "path"}, {"server", "nowait"})
        check_id("-chardev id", kv["id"])
        self._add(self.chardevs, "-chardev", kv)

    def object(self, v: str) -> None:
        kv = split_kv("-object", v, positional="type")
        if kv.get("type") != "rng-random":
            raise ConfigError(f"-object: type {kv.get('type')!r}; accepted: rng-random,id=ID,filename=PATH")
        check_keys("-object rng-random", kv, {"type", "id", "filename"}, set())
        if kv["filename"] not in RNG_FILES:
            raise ConfigError(f"-object {kv['id']}: filename={kv['filename']!r}; accepted: "
                              f"{', '.join(RNG_FILES)} (both served by getrandom)")
        if kv["id"] in self.rngs:
            raise ConfigError(f"-object: id {kv['id']!r} given twice")
        self.rngs[check_id("-object id", kv["id"])] = kv["filename"]

    def device(self, v: str) -> None:
        self.devices.append(split_kv("-device", v, positional="driver"))

    def _placement(self, cfg: VmConfig, kv: dict[str, str]) -> tuple[int | None, str | None]:
        """Take a PCI device's ``bus=`` and ``addr=`` from ``kv`` and make it the virtio-mmio
        device it stands for (``virtio-blk-pci`` -> ``virtio-blk-device``); returns its devfn
        on bus 0 (None: the next free slot, or behind a root port) and the root port it is
        put into (None: bus 0). A virtio-mmio device on a PCI machine, or the other way
        round, is an error."""
        driver = kv.get("driver", "")
        if driver not in PCI_DEVICES and driver != ROOT_PORT:
            pci = next((k for k, v in PCI_DEVICES.items() if v == driver), None)
            if cfg.pci and pci is not None:
                raise ConfigError(f"-device {driver}: a virtio-mmio device; -machine q35 takes {pci}")
            return None, None
        if not cfg.pci:
            raise ConfigError(f"-device {driver}: a PCI device; it needs -machine q35")
        bus = kv.pop("bus", "pcie.0")
        kv.pop("multifunction", None)       # functions 1-7 of a slot make function 0 multi-function
        kv["driver"] = PCI_DEVICES.get(driver, driver)
        addr = kv.pop("addr", None)
        if bus == "pcie.0":
            return (None if addr is None else parse_pci_addr(f"-device {driver} addr", addr)), None
        ports = [p["id"] for p in self.devices if p.get("driver") == ROOT_PORT and "id" in p]
        if driver == ROOT_PORT or bus not in ports:
            accepted = ", ".join(["pcie.0"] + ([] if driver == ROOT_PORT else ports))
            raise ConfigError(f"-device {driver}: bus={bus!r}; accepted: {accepted}")
        if driver not in PORT_DEVICES:
            raise ConfigError(f"-device {driver}: bus={bus}: a root port takes {' or '.join(PORT_DEVICES)}; "
                              "put it on pcie.0")
        if addr is not None and addr.lower() not in ("0", "0x0", "0.0", "0x0.0"):
            raise ConfigError(f"-device {driver}: addr={addr!r} behind root port {bus}; accepted: 0x0 "
                              "(a root port's slot holds one device)")
        return None, bus

    def monitor(self, v: str) -> None:
        kv = split_kv("-mon", v)
        check_keys("-mon", kv, {"chardev"}, {"id", "mode"})
        if kv.get("mode", "control") != "control":
            raise ConfigError(f"-mon: mode={kv['mode']!r}; accepted: control (QMP)")
        self.monitors.append(kv)

    @staticmethod
    def _add(table: dict[str, dict[str, str]], option: str, kv: dict[str, str]) -> None:
        if kv["id"] in table:
            raise ConfigError(f"{option}: id {kv['id']!r} given twice")
        table[kv["id"]] = kv

    # --- pairing, once every option is read ---
    def apply(self, cfg: VmConfig) -> None:
        for legacy in self._legacy:
            legacy(cfg)
        # (the driver as given, the device's devfn or None, its root port or None): the -pci
        # drivers are the others' now.
        given = [(kv.get("driver"), *self._placement(cfg, kv)) for kv in self.devices]
        serial = [kv for kv in self.devices if kv.get("driver") == "virtio-serial-device"]
        consoles = [kv for kv in self.devices if kv.get("driver") == "virtconsole"]
        if len(serial) > 1:
            raise ConfigError("-device virtio-serial-device: only one is supported")
        if consoles and not serial:
            raise ConfigError("-device virtconsole: needs -device virtio-serial-device")
        if serial and not consoles:
            raise ConfigError("-device virtio-serial-device: has no port; add -device virtconsole,"
                              "chardev=ID,id=ID,nr=0")
        # The root ports first: a device may name one given after it.
        in_order = sorted(zip(self.devices, given, strict=True),
                          key=lambda d: d[0].get("driver") != ROOT_PORT)
        for kv, (driver, at, port) in in_order:
            handler = DEVICES.get(kv.get("driver") or "")
            if handler is None:
                accepted = [*DEVICES, *PCI_DEVICES, ROOT_PORT] if cfg.pci else DEVICES
                raise ConfigError(f"-device: unknown device {driver!r}; accepted: {', '.join(accepted)}")
            handler(self, cfg, kv)
            if at is not None:
                # The console's PCI function is its virtio-serial-pci; the console's id is its port's.
                name = "" if kv["driver"] == "virtio-serial-device" else _device_id(cfg, kv)
                _place(cfg, name, at, driver or "")
            if port is not None:
                taken = cfg.root_ports[port].device
                if taken is not None:
                    raise ConfigError(f"-device {driver}: root port {port} already holds {taken}")
                cfg.root_ports[port].device = _device_id(cfg, kv)
        if "" in cfg.pci_slots:
            at = cfg.pci_slots.pop("")
            if cfg.console is not None:
                cfg.pci_slots[cfg.console.id] = at
        for name, at in cfg.pci_slots.items():
            if at & 7 and at & ~7 not in cfg.pci_slots.values():
                raise ConfigError(f"-device {name}: addr {at >> 3:#x}.{at & 7}: slot {at >> 3:#x} has no "
                                  "function 0 (software looks for the other functions only there)")
        for mon in self.monitors:
            path = self._socket("-mon", mon["chardev"], server=True)
            cfg.api_channel = f"unix:{path}"
        for d in self.drives.values():          # the 2020 form: a disk by itself
            replace(cfg.drives, _drive_config(d["id"], d, d.get("serial")))
        for option, table in (("-netdev", self.netdevs), ("-chardev", self.chardevs), ("-object", self.rngs)):
            if table:
                raise ConfigError(f"{option} id={next(iter(table))}: no -device uses it")

    def _socket(self, where: str, chardev: str, *, server: bool) -> str:
        kv = self.chardevs.pop(chardev, None)
        if kv is None:
            raise ConfigError(f"{where}: no -chardev socket,id={chardev}")
        if server and "server" not in kv:
            raise ConfigError(f"{where}: -chardev {chardev} must be a server (add server,nowait): "
                              "AltoVirt listens on it")
        return kv["path"]

    def _blk(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        check_keys("-device virtio-blk-device", kv, {"driver", "id", "drive"}, {"serial"})
        drive = self.drives.pop(kv["drive"], None)
        if drive is None:
            raise ConfigError(f"-device {kv['id']}: no -drive id={kv['drive']}")
        if "serial" in drive:
            raise ConfigError(f"-drive id={drive['id']}: serial= goes on the -device")
        # The disk (and its block node, for QMP) is named after the device.
        replace(cfg.drives, _drive_config(check_id("-device id", kv["id"]), drive, kv.get("serial")))

    def _net(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        check_keys("-device virtio-net-device", kv, {"driver", "id", "netdev"}, {"mac"})
        net = self.netdevs.pop(kv["netdev"], None)
        where = f"-netdev id={kv['netdev']}"
        if net is None:
            raise ConfigError(f"-device {kv['id']}: no -netdev tap,id={kv['netdev']}")
        if ("ifname" in net) + ("fd" in net) + ("fds" in net) != 1:
            raise ConfigError(f"{where}: give the tap as one of ifname=, fd= or fds=")
        fd = None
        if "fd" in net or "fds" in net:
            fds = net.get("fd") or net["fds"]
            if ":" in fds:
                raise ConfigError(f"{where}: {fds!r} is several queues; multiqueue is not supported, "
                                  "give one descriptor")
            fd = _fd(where, fds)
        parse_int(f"{where} queues", net.get("queues", "1"), 1, 1)     # one queue pair
        vhost = parse_bool(f"{where} vhost", net.get("vhost", "off"))
        if "vhostfd" in net and not vhost:
            raise ConfigError(f"{where}: vhostfd= needs vhost=on")
        replace(cfg.nets, NetConfig(
            id=check_id("-device id", kv["id"]),
            tap=check_tap(f"{where} ifname", net["ifname"]) if "ifname" in net else "",
            mac=check_mac(f"-device {kv['id']} mac", kv["mac"]) if "mac" in kv else None,
            vhost=vhost, fd=fd,
            vhost_fd=_fd(f"{where} vhostfd", net["vhostfd"]) if "vhostfd" in net else None))

    def _console(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        check_keys("-device virtconsole", kv, {"driver", "id", "chardev"}, {"nr"})
        if kv.get("nr", "0") != "0":
            raise ConfigError(f"-device {kv['id']}: nr={kv['nr']}; accepted: 0 (one console port)")
        path = self._socket(f"-device {kv['id']}", kv["chardev"], server=True)
        _console(cfg, "-device virtconsole", kv["id"], path)

    def _rng(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        where = "-device virtio-rng"
        check_keys(where, kv, {"driver"}, {"id", "rng", "max-bytes", "period"})
        if "rng" in kv and self.rngs.pop(kv["rng"], None) is None:
            raise ConfigError(f"{where}: no -object rng-random,id={kv['rng']}")
        rng_id = check_id(f"{where} id", kv.get("id", "rng0"))
        if cfg.rng is not None and cfg.rng.id != rng_id:
            raise ConfigError(f"{where}: only one entropy device is supported")
        max_bytes = None
        if "max-bytes" in kv:
            max_bytes = parse_int(f"{where} max-bytes", kv["max-bytes"], 1, 1 << 31)
        period = parse_int(f"{where} period", kv.get("period", "1000"), 1, 3_600_000)
        cfg.rng = RngConfig(rng_id, max_bytes, period)

    def _root_port(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        """A pcie-root-port (QEMU's, StratoVirt 2.x's): ``slot`` its Physical Slot Number (by
        default the count of root ports before it, where QEMU would refuse a second slot 0),
        ``port`` its port number, ``chassis`` the chassis the slot number is unique in."""
        check_keys(f"-device {ROOT_PORT}", kv, {"driver", "id"}, {"port", "chassis", "slot"})
        name = check_id(f"-device {ROOT_PORT} id", kv["id"])
        where = f"-device {ROOT_PORT},id={name}"
        if name in cfg.root_ports:
            raise ConfigError(f"{where}: id given twice")
        slot = parse_int(f"{where} slot", kv.get("slot", str(len(cfg.root_ports))), 0, PHYSICAL_SLOT_MAX)
        chassis = parse_int(f"{where} chassis", kv.get("chassis", "0"), 0, 0xFF)
        port = parse_int(f"{where} port", kv.get("port", "0"), 0, 0xFF)
        cfg.root_ports[name] = RootPortConfig(slot, port, chassis)

    def _balloon(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        """StratoVirt 2.x's virtio-balloon-device: empty at start, set with QMP's ``balloon``."""
        where = "-device virtio-balloon-device"
        check_keys(where, kv, {"driver"}, {"id", "deflate-on-oom", "free-page-reporting", "free-page-hint"})
        if cfg.balloon is not None:
            raise ConfigError(f"{where}: only one balloon is supported")
        deflate = parse_bool(f"{where} deflate-on-oom", kv.get("deflate-on-oom", "off"))
        reporting = parse_bool(f"{where} free-page-reporting", kv.get("free-page-reporting", "off"))
        hinting = parse_bool(f"{where} free-page-hint", kv.get("free-page-hint", "off"))      # QEMU's name
        cfg.balloon = BalloonConfig(deflate_on_oom=deflate, free_page_reporting=reporting,
                                    free_page_hinting=hinting)

    def _vsock(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        vhost = kv["driver"] == "vhost-vsock-device"
        where = f"-device {kv['driver']}"
        check_keys(where, kv, {"driver", "id", "guest-cid"}, {"vhostfd"} if vhost else {"uds-path"})
        if cfg.vsock is not None and cfg.vsock.id != kv["id"]:
            raise ConfigError(f"{where}: only one vsock device is supported")
        cfg.vsock = VsockConfig(
            check_id(f"{where} id", kv["id"]),
            parse_int(f"{where} guest-cid", kv["guest-cid"], VSOCK_MIN_CID, VSOCK_MAX_CID),
            kv.get("uds-path") or None, vhost=vhost,
            vhost_fd=_fd(f"{where} vhostfd", kv["vhostfd"]) if "vhostfd" in kv else None)

    def _serial(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        check_keys("-device virtio-serial-device", kv, {"driver"}, {"id"})

    def _fs(self, cfg: VmConfig, kv: dict[str, str]) -> None:
        where = "-device vhost-user-fs-device"
        check_keys(where, kv, {"driver", "id", "chardev", "tag"}, set())
        if cfg.fs is not None and cfg.fs.id != kv["id"]:
            raise ConfigError(f"{where}: only one virtio-fs device is supported")
        if not 0 < len(kv["tag"].encode()) <= TAG_MAX:
            raise ConfigError(f"{where}: tag={kv['tag']!r}; give 1 to {TAG_MAX} bytes")
        # The back end (virtiofsd) listens; AltoVirt connects, whatever server says (as StratoVirt).
        path = self._socket(f"{where} {kv['id']}", kv["chardev"], server=False)
        cfg.fs = FsConfig(check_id(f"{where} id", kv["id"]), kv["tag"], path)


def _device_id(cfg: VmConfig, kv: dict[str, str]) -> str:
    """The id the configuration knows a device by, once its handler has run."""
    if kv["driver"] == "virtio-rng-device":
        assert cfg.rng is not None
        return cfg.rng.id
    return kv["id"]


def _place(cfg: VmConfig, name: str, at: int, driver: str) -> None:
    for other, taken in cfg.pci_slots.items():
        if taken == at:
            raise ConfigError(f"-device {driver}: addr {at >> 3:#x}.{at & 7} is taken by "
                              f"{other or 'the console'}")
    cfg.pci_slots[name] = at


def _drive_config(name: str, d: dict[str, str], serial: str | None) -> DriveConfig:
    where = f"-drive id={d['id']}"
    limiter = None
    if "throttling.iops-total" in d:
        # StratoVirt 2.x's limit of requests per second, as a bucket of that many refilled each second.
        iops = parse_int(f"{where} throttling.iops-total", d["throttling.iops-total"], 1, 1 << 32)
        limiter = RateLimiterConfig(ops=TokenBucketConfig(iops, 1000))
    return DriveConfig(id=name, path=d["file"],
                       read_only=parse_bool(f"{where} readonly", d.get("readonly", "off")),
                       direct=parse_bool(f"{where} direct", d.get("direct", "on")), serial=serial or None,
                       rate_limiter=limiter, io_engine="Async" if d.get("aio") in AIO_RING else "Sync")


def _console(cfg: VmConfig, where: str, console_id: str, path: str) -> None:
    if cfg.console is not None and cfg.console.id != console_id:
        raise ConfigError(f"{where}: only one console is supported")
    cfg.console = ConsoleConfig(check_id(f"{where} id", console_id), path)


DEVICES: dict[str, Callable[[Devices, VmConfig, dict[str, str]], None]] = {
    "virtio-blk-device": Devices._blk,
    "virtio-net-device": Devices._net,
    "virtio-serial-device": Devices._serial,
    "virtconsole": Devices._console,
    "virtio-rng": Devices._rng,
    "virtio-rng-device": Devices._rng,
    "vsock": Devices._vsock,
    "vhost-vsock-device": Devices._vsock,
    "vhost-user-fs-device": Devices._fs,
    "virtio-balloon-device": Devices._balloon,
    ROOT_PORT: Devices._root_port,
}
# What a root port's slot takes, at start (bus=ID) and by device_add.
PORT_DEVICES = ("virtio-blk-pci", "virtio-net-pci")
# StratoVirt 2.x's (and QEMU's) PCI devices, by the virtio-mmio device each stands for.
PCI_DEVICES = {
    "virtio-blk-pci": "virtio-blk-device",
    "virtio-net-pci": "virtio-net-device",
    "virtio-serial-pci": "virtio-serial-device",
    "virtio-rng-pci": "virtio-rng-device",
    "vhost-vsock-pci": "vhost-vsock-device",
    "vhost-user-fs-pci": "vhost-user-fs-device",
    "virtio-balloon-pci": "virtio-balloon-device",
}
