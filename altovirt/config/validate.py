"""Value parsers and whole-configuration checks shared by the CLI and JSON front ends.

Each function raises :class:`ConfigError` with a message of the form
"<where>: <what is wrong>; <what is accepted>", where ``where`` is the
option (``-m``) or JSON path (``machine-config.mem_size``) the value came from.
"""

from __future__ import annotations

import os
import re
import socket
import stat

from .model import (
    MACHINE,
    MAX_DRIVES,
    MAX_NICS,
    MEM_MAX,
    MEM_MIN,
    VCPUS_MAX,
    VCPUS_MIN,
    VSOCK_MAX_CID,
    VSOCK_MIN_CID,
    ConfigError,
    MigrationUri,
    VmConfig,
)

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TAP = re.compile(r"^[^\s/]{1,15}$")          # IFNAMSIZ - 1
TRUE, FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def parse_size(where: str, text: str) -> int:
    """Bytes, or a number with a K/M/G/T suffix (binary units)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{where}: invalid size {text!r}; give bytes or a number with "
                          "a K, M or G suffix (e.g. 512M, 2G)")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def parse_bool(where: str, text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ConfigError(f"{where}: invalid boolean {text!r}; use on/off or true/false")


def parse_acpi(where: str, text: str | bool) -> bool:
    """An explicit ACPI setting: on is for x86_64 VMs; an aarch64 VM describes itself in a
    device tree (ACPI for arm64 is not there yet)."""
    on = parse_bool(where, text)
    if on and MACHINE != "x86_64":
        raise ConfigError(f"{where}=on: ACPI is for x86_64 VMs; an {MACHINE} VM describes itself in a "
                          "device tree (accepted: off)")
    return on


def parse_int(where: str, text: str | int, low: int, high: int) -> int:
    if isinstance(text, bool):
        raise ConfigError(f"{where}: expected an integer in [{low}, {high}], got {text!r}")
    try:
        value = text if isinstance(text, int) else int(str(text), 0)
    except ValueError as e:
        raise ConfigError(f"{where}: invalid integer {text!r}; accepted range [{low}, {high}]") from e
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range; accepted range [{low}, {high}]")
    return value


def parse_pci_addr(where: str, text: str) -> int:
    """``SLOT[.FUNCTION]``, hexadecimal with or without 0x (QEMU's addr=), as a devfn on bus 0:
    slot 1 to 31 (0 is the host bridge's), function 0 to 7."""
    slot, dot, function = text.partition(".")
    try:
        s, f = int(slot, 16), int(function, 16) if dot else 0
    except ValueError:
        s = f = -1
    if not (1 <= s < 32 and 0 <= f < 8):
        raise ConfigError(f"{where}: {text!r} is not a PCI address; accepted: SLOT[.FUNCTION], slot 0x1 "
                          "to 0x1f (0 is the host bridge), function 0 to 7")
    return s << 3 | f


def check_id(where: str, value: str) -> str:
    if not _ID.match(value):
        raise ConfigError(f"{where}: invalid id {value!r}; use 1-64 letters, digits, '_', '-' or '.'")
    return value


def check_mac(where: str, value: str) -> str:
    if not _MAC.match(value):
        raise ConfigError(f"{where}: invalid MAC {value!r}; expected six hex octets like 0e:90:df:9f:a8:88")
    if int(value[:2], 16) & 1:
        raise ConfigError(f"{where}: MAC {value} is a multicast address; use a unicast one "
                          "(first octet even)")
    return value.lower()


def link_local(address: str) -> bool:
    """Firecracker's rule for the MMDS address (utils/net/ipv4addr.rs): in 169.254.0.0/16 but
    not its first or last /24. ConfigError if ``address`` is no dotted IPv4 address."""
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise ConfigError(f"{address!r} is not an IPv4 address")
    return parts[:2] == ["169", "254"] and int(parts[2]) not in (0, 255)


def check_tap(where: str, value: str) -> str:
    if not _TAP.match(value):
        raise ConfigError(f"{where}: invalid tap name {value!r}; 1-15 characters, no '/' or spaces")
    return value


def check_readable_file(where: str, path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: {path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"{where}: {path}: {e.strerror}") from e
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ConfigError(f"{where}: {path}: not a regular file or block device")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: {path}: permission denied")
    return path


def check_new_path(where: str, path: str) -> str:
    """A path we will create: it must not exist, and its directory must."""
    if not path:
        raise ConfigError(f"{where}: empty path")
    if os.path.lexists(path):
        raise ConfigError(f"{where}: {path} already exists; it must not exist before start")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{where}: directory {parent} does not exist")
    return path


def check_api_channel(where: str, value: str) -> str:
    if not value.startswith("unix:") or len(value) == len("unix:"):
        raise ConfigError(f"{where}: invalid channel {value!r}; expected unix:/path/to/socket")
    check_new_path(where, value[len("unix:"):])
    return value


MIGRATION_URIS = "file:DIR, tcp:HOST:PORT or unix:PATH"


def parse_migration_uri(where: str, text: str) -> MigrationUri:
    """``file:DIR``, ``tcp:HOST:PORT`` or ``unix:PATH``. HOST is an IP address (``[v6]`` too),
    ``localhost``, or empty for every address: no name is looked up, as a VMM in its
    sandbox cannot load the resolver's modules."""
    kind, colon, rest = text.partition(":")
    if colon and rest and kind in ("file", "unix"):
        return MigrationUri(kind, path=rest)
    if colon and kind == "tcp":
        host, colon, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (colon and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{where}: {text!r}: expected tcp:HOST:PORT with a port in [1, 65535]")
        host = {"": "0.0.0.0", "localhost": "127.0.0.1"}.get(host, host)
        if not _is_ip_address(host):
            raise ConfigError(f"{where}: {text!r}: HOST must be an IP address or localhost")
        return MigrationUri("tcp", host=host, port=int(port))
    raise ConfigError(f"{where}: unsupported URI {text!r}; accepted: {MIGRATION_URIS}")


def _is_ip_address(host: str) -> bool:
    """An IPv4 or IPv6 address, as the C library reads one: socket is loaded already, where the
    ipaddress module would be imported when QMP's migrate asks, on a thread confined by then."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def _check_root_ports(cfg: VmConfig, ids: dict[str, str]) -> None:
    """Root ports only on PCI, named apart from the devices; each holds a disk or NIC of the
    configuration, and no device is on bus 0 as well."""
    where = "-device pcie-root-port"
    if cfg.root_ports and not cfg.pci:
        raise ConfigError(f"{where}: a PCI device; it needs -machine q35")
    held = [p.device for p in cfg.root_ports.values() if p.device is not None]
    if len(set(held)) != len(held):
        raise ConfigError(f"{where}: two root ports hold the same device")
    disks_and_nics = {d.id for d in cfg.drives} | {n.id for n in cfg.nets}
    for name, port in cfg.root_ports.items():
        if name in ids:
            raise ConfigError(f"{where}: id {name!r} is already used by {ids[name]}; ids must be unique")
        if port.device is not None and port.device not in disks_and_nics:
            raise ConfigError(f"{where},id={name}: holds {port.device!r}, which is no disk or NIC")
        if port.device in cfg.pci_slots:
            raise ConfigError(f"{where},id={name}: {port.device!r} has an address on bus 0 too")
    slots = [(p.chassis, p.slot) for p in cfg.root_ports.values()]
    if len(set(slots)) != len(slots):
        raise ConfigError(f"{where}: two root ports have the same chassis= and slot=; give each its own")


def check_vm(cfg: VmConfig) -> VmConfig:
    """Cross-field checks on a complete configuration."""
    if cfg.incoming is None:            # a VM loaded from a snapshot reads its kernel only to reboot
        if not cfg.kernel:
            raise ConfigError("-kernel: no kernel given; pass -kernel /path/to/vmlinux.bin "
                              "or boot-source.kernel_image_path in -config")
        check_readable_file("-kernel", cfg.kernel)
    if cfg.initrd:
        check_readable_file("-initrd", cfg.initrd)
    parse_int("-smp", cfg.vcpus, VCPUS_MIN, VCPUS_MAX)
    if not MEM_MIN <= cfg.mem_size <= MEM_MAX:
        raise ConfigError(f"-m: {cfg.mem_size >> 20} MiB is out of range; accepted range "
                          "[128M, 512G]")
    if cfg.mem_size % 4096:
        raise ConfigError(f"-m: {cfg.mem_size} bytes is not a multiple of 4 KiB")
    if cfg.incoming is not None and cfg.incoming.uri is None and not cfg.api_channel:
        raise ConfigError("-incoming defer: the VM waits for QMP migrate-incoming; give -api-channel too")
    if cfg.pidfile and not cfg.daemonize:
        raise ConfigError("-pidfile: only valid together with -daemonize")
    if cfg.pidfile:
        check_new_path("-pidfile", cfg.pidfile)
    if cfg.serial_stdio and cfg.daemonize:
        raise ConfigError("-serial: stdio cannot be used with -daemonize; a daemon has no terminal")
    if cfg.log_file:
        parent = os.path.dirname(os.path.abspath(cfg.log_file))
        if not os.path.isdir(parent):
            raise ConfigError(f"-D: directory {parent} does not exist")
    if cfg.api_channel:
        check_api_channel("-api-channel", cfg.api_channel)
    if cfg.xenstore:
        check_new_path("-xenstore", cfg.xenstore)
    if len(cfg.drives) > MAX_DRIVES:
        raise ConfigError(f"-drive: {len(cfg.drives)} disks given; at most {MAX_DRIVES} are supported")
    if len(cfg.nets) > MAX_NICS:
        raise ConfigError(f"-netdev: {len(cfg.nets)} NICs given; at most {MAX_NICS} are supported")
    seen: dict[str, str] = {}
    devices = [("-drive", d.id) for d in cfg.drives] + [("-netdev", n.id) for n in cfg.nets]
    if cfg.console:
        devices.append(("-chardev", cfg.console.id))
    if cfg.fs:
        devices.append(("-device vhost-user-fs-device", cfg.fs.id))
    if cfg.vsock:
        devices.append(("-device vsock", cfg.vsock.id))
    if cfg.rng:
        devices.append(("-device virtio-rng", cfg.rng.id))
    for opt, dev_id in devices:
        if dev_id in seen:
            raise ConfigError(f"{opt}: id {dev_id!r} is already used by {seen[dev_id]}; ids must be unique")
        seen[dev_id] = opt
    _check_root_ports(cfg, seen)
    for d in cfg.drives:
        check_readable_file(f"-drive id={d.id}", d.path)
        if cfg.kernel and os.path.realpath(d.path) == os.path.realpath(cfg.kernel):
            raise ConfigError(f"-drive id={d.id}: {d.path} is the kernel image")
    paths = [os.path.realpath(d.path) for d in cfg.drives]
    if len(set(paths)) != len(paths):
        raise ConfigError("-drive: the same image file is given twice")
    taps = [n.tap for n in cfg.nets if n.fd is None]
    if len(set(taps)) != len(taps):
        raise ConfigError("-netdev: the same tap device is given twice")
    fds = [fd for n in cfg.nets for fd in (n.fd, n.vhost_fd) if fd is not None]
    if cfg.vsock and cfg.vsock.vhost_fd is not None:
        fds.append(cfg.vsock.vhost_fd)
    if len(set(fds)) != len(fds):
        raise ConfigError("-netdev, -device: the same file descriptor is given twice")
    macs = [n.mac for n in cfg.nets if n.mac]
    if len(set(macs)) != len(macs):
        raise ConfigError("-netdev: the same MAC address is given twice")
    for n in cfg.nets:
        # The host kernel moves a vhost NIC's frames: the VMM never sees them to limit or answer.
        if n.vhost and (n.rx_rate_limiter or n.tx_rate_limiter):
            raise ConfigError(f"-netdev id={n.id}: vhost=on takes no rate limiter (the host kernel moves "
                              "its frames); drop one or the other")
        if n.vhost and cfg.mmds is not None and n.id in cfg.mmds.network_interfaces:
            raise ConfigError(f"-netdev id={n.id}: vhost=on cannot carry MMDS (the host kernel moves its "
                              "frames); name another NIC in mmds.network_interfaces")
    if cfg.console:
        check_new_path(f"-chardev id={cfg.console.id}", cfg.console.socket_path)
    if cfg.fs and not cfg.mem_share:
        raise ConfigError(f"-device vhost-user-fs-device id={cfg.fs.id}: the back end maps guest RAM; "
                          "add -machine mem-share=on")
    if cfg.vsock:
        parse_int("-device vsock guest-cid", cfg.vsock.guest_cid, VSOCK_MIN_CID, VSOCK_MAX_CID)
        if cfg.vsock.uds_path is None and not cfg.vsock.vhost:
            import tempfile  # only a vsock device without uds_path needs it
            cfg.vsock.uds_path = os.path.join(tempfile.gettempdir(), f"altovirt-{cfg.vsock.id}.vsock")
        if cfg.vsock.uds_path is not None:
            check_new_path(f"-device vsock id={cfg.vsock.id} uds-path", cfg.vsock.uds_path)
    return cfg
