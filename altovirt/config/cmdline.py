"""The StratoVirt-style command line: ``altovirt -OPTION VALUE ...``.

Options take one dash (QEMU style); the ``--`` spelling is accepted too.
Both StratoVirt syntaxes work: 2020's (a device in one option) and 2.x's
(a backend and a ``-device`` that uses it; see :mod:`.devices`). A value never
starts with ``-`` where it would be an option: ``-D`` alone logs to stderr.
``-config FILE`` is read first wherever it appears, and every other option
then overrides or adds to what the file says (a device with the id of one in
the file replaces it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import AltoVirtError
from . import jsonconfig
from .devices import Devices, split_kv
from .keys import check_keys
from .model import (
    MEM_MIN,
    PCI_MACHINE,
    VCPUS_MAX,
    VCPUS_MIN,
    XEN_DOMID_MAX,
    XEN_DOMID_MIN,
    ConfigError,
    IncomingConfig,
    VmConfig,
)
from .validate import check_api_channel, parse_acpi, parse_bool, parse_int, parse_migration_uri, parse_size

USAGE = """\
usage: altovirt -kernel PATH [-append CMDLINE] [-initrd PATH] [-smp [cpus=]N] [-m SIZE]
                [-drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,serial=S]]...
                [-netdev id=ID,netdev=TAP[,mac=MAC][,vhost=on|off]]... [-chardev id=ID,path=SOCKET]
                [-device vsock,id=ID,guest-cid=N[,uds-path=SOCKET]]
                [-device virtio-rng[,id=ID,max-bytes=N,period=MS]]
                [-api-channel unix:PATH | -qmp unix:PATH,server,nowait] [-serial stdio]
                [-xenstore SOCKET [-xen-domid N]]
                [-machine [type=]microvm|q35[,acpi=on|off][,dump-guest-core=on|off][,mem-share=on|off]]
                [-name NAME] [-uuid UUID] [-D [LOGFILE]] [-daemonize [-pidfile PATH]]
                [-disable-seccomp] [-omit_vm_memory] [-config FILE.json] [-debug] [-version]
                [-incoming file:DIR|tcp:HOST:PORT|unix:PATH|defer[,resume=on][,mem=map|copy]]
StratoVirt 2.x's devices (a backend, and a -device that uses it):
                [-drive id=ID,file=PATH[,if=none][,readonly[=on|off]][,direct=on|off][,aio=MODE]
                 [,format=raw] -device virtio-blk-device,drive=ID,id=DEV[,serial=S]]...
                [-netdev tap,id=ID,ifname=TAP|fd=N|fds=N[,vhost=on[,vhostfd=N]]
                 -device virtio-net-device,netdev=ID,id=DEV[,mac=MAC]]...
                [-chardev socket,id=ID,path=SOCKET,server,nowait -device virtio-serial-device
                 -device virtconsole,chardev=ID,id=DEV,nr=0]
                [-object rng-random,id=ID,filename=/dev/urandom -device virtio-rng-device,rng=ID]
                [-device vhost-vsock-device,id=ID,guest-cid=N[,vhostfd=N]]
                [-chardev socket,id=ID,path=SOCKET -device vhost-user-fs-device,chardev=ID,tag=TAG,id=DEV
                 (with -machine mem-share=on)]
                [-chardev socket,id=ID,path=SOCKET,server,nowait -mon chardev=ID,id=MON,mode=control]
                With -machine q35 (x86_64), each on PCI as virtio-blk-pci, virtio-net-pci,
                virtio-serial-pci, virtio-rng-pci, vhost-vsock-pci, vhost-user-fs-pci and
                virtio-balloon-pci, each with [,bus=pcie.0][,addr=SLOT[.FUNCTION]]
                [-device pcie-root-port,id=ID[,bus=pcie.0][,addr=SLOT[.FUNCTION]][,slot=N][,port=N]
                 [,chassis=N]]: a hot-plug slot; virtio-blk-pci or virtio-net-pci with bus=ID go
                 into it at start or by QMP's device_add

Boots a micro-VM on KVM. Sizes take bytes or a K/M/G suffix (a bare number
below 128M is MiB: -m 2048); -smp in [1, 254], -m in [128M, 512G]. Exit
status: 0 the guest powered off or reset, 1 VMM or KVM error, 2 usage or
configuration error, 3 guest panic, 128+N stopped by signal N.
"""

# Options whose values are devices, paired once every option is read (see .devices).
DEVICE_OPTIONS = {"drive": Devices.drive, "netdev": Devices.netdev, "chardev": Devices.chardev,
                  "device": Devices.device, "object": Devices.object, "mon": Devices.monitor}
VALUE_OPTIONS = {"name", "machine", "kernel", "append", "initrd", "smp", "m", "api-channel", "qmp", "serial",
                 "D", "pidfile", "config", "xenstore", "xen-domid", "incoming", "uuid", *DEVICE_OPTIONS}
OPTIONAL_VALUE = {"D"}          # alone: log to stderr
FLAG_OPTIONS = {"disable-seccomp", "omit_vm_memory", "daemonize", "debug", "help", "h", "version"}
UUID = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


class HelpRequested(AltoVirtError):
    """-help or -version: not an error; the message is printed and the VMM exits 0."""

    exit_status = 0


def _smp(cfg: VmConfig, v: str) -> None:
    kv = split_kv("-smp", v, positional="cpus")
    check_keys("-smp", kv, {"cpus"}, set())
    cfg.vcpus = parse_int("-smp", kv["cpus"], VCPUS_MIN, VCPUS_MAX)


MACHINE_TYPES = ("microvm", PCI_MACHINE)


def _machine(cfg: VmConfig, v: str) -> None:
    """-machine [type=]microvm|q35[,acpi=on|off][,dump-guest-core=on|off][,mem-share=on|off][,accel=kvm]
    (QEMU's and StratoVirt 2.x's spelling): q35 puts the virtio devices on a PCIe host bridge."""
    kv = split_kv("-machine", v, positional="type")
    check_keys("-machine", kv, set(), {"type", "acpi", "dump-guest-core", "mem-share", "accel"})
    kind = kv.get("type", "microvm")
    if kind not in MACHINE_TYPES:
        raise ConfigError(f"-machine: unknown machine type {kind!r}; accepted: {', '.join(MACHINE_TYPES)}")
    cfg.pci = kind == PCI_MACHINE
    if kv.get("accel", "kvm") != "kvm":
        raise ConfigError(f"-machine: accel={kv['accel']!r}; accepted: kvm")
    if "mem-share" in kv:               # on: RAM a shared memfd, that vhost-user back ends map
        cfg.mem_share = parse_bool("-machine mem-share", kv["mem-share"])
    if "acpi" in kv:
        cfg.acpi = parse_acpi("-machine acpi", kv["acpi"])
    if "dump-guest-core" in kv:         # off: guest RAM left out of core dumps, as -omit_vm_memory
        cfg.omit_vm_memory = not parse_bool("-machine dump-guest-core", kv["dump-guest-core"])


def _mem(cfg: VmConfig, v: str) -> None:
    """-m: bytes or a number with a suffix (2020); a bare number too small to be bytes of
    RAM is MiB, as StratoVirt 2.x and QEMU read it (-m 2048)."""
    size = parse_size("-m", v)
    cfg.mem_size = size << 20 if v.strip().isdigit() and size < MEM_MIN else size


def _uuid(cfg: VmConfig, v: str) -> None:
    if not UUID.match(v):
        raise ConfigError(f"-uuid: invalid UUID {v!r}; expected 8-4-4-4-12 hex digits")
    cfg.uuid = v.lower()


def _incoming(cfg: VmConfig, v: str) -> None:
    """-incoming URI|defer[,resume=on|off][,mem=map|copy] (",," for a comma in the URI)."""
    kv = split_kv("-incoming", v, positional="uri")
    check_keys("-incoming", kv, {"uri"}, {"resume", "mem"})
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
    "smp": _smp, "m": _mem, "uuid": _uuid, "serial": _serial, "incoming": _incoming,
    "api-channel": _api_channel, "qmp": _qmp,
    "xenstore": _set("xenstore"),
    "xen-domid": lambda cfg, v: setattr(cfg, "xen_domid", parse_int("-xen-domid", v, XEN_DOMID_MIN,
                                                                      XEN_DOMID_MAX)),
}
FLAGS = {"disable-seccomp": ("seccomp", False), "omit_vm_memory": ("omit_vm_memory", True),
         "daemonize": ("daemonize", True), "debug": ("debug", True)}


def _option(arg: str) -> str | None:
    """The option ``arg`` names (``-D``, ``--smp=2``), or None if it is not one."""
    name = arg.lstrip("-").partition("=")[0]
    known = arg.startswith("-") and name in FLAG_OPTIONS | VALUE_OPTIONS
    return name if known else None


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    opts: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ConfigError(f"unexpected argument {arg!r}; options start with '-' "
                              "(run 'altovirt -help')")
        name, eq, inline = arg.lstrip("-").partition("=")
        if name in FLAG_OPTIONS:
            if eq:
                raise ConfigError(f"-{name}: takes no value")
            opts.append((name, None))
        elif name in VALUE_OPTIONS:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if eq:
                opts.append((name, inline))
            elif following is not None and _option(following) is None:
                i += 1
                opts.append((name, following))
            elif name in OPTIONAL_VALUE:
                opts.append((name, None))
            else:
                after = f" ({following} is an option)" if following is not None else ""
                raise ConfigError(f"-{name}: missing value{after}")
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
    devices = Devices()
    for name, value in opts:
        if name == "config":
            continue
        if name in FLAGS:
            attr, flag = FLAGS[name]
            setattr(cfg, attr, flag)
        elif name == "D" and value is None:
            cfg.log_file, cfg.log_stderr = None, True
        elif name in DEVICE_OPTIONS:
            assert value is not None
            DEVICE_OPTIONS[name](devices, value)
        else:
            assert value is not None
            HANDLERS[name](cfg, value)
    devices.apply(cfg)
    return cfg
