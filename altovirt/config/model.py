"""The validated VM configuration: plain data, built by the command-line and
JSON front ends, consumed by the VM builder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import EXIT_USAGE, AltoVirtError

# The host's machine, read once: a configuration may be made on a confined thread (an API
# request), where uname is not among the allowed system calls.
MACHINE = os.uname().machine

MiB, GiB = 1 << 20, 1 << 30
VCPUS_MIN, VCPUS_MAX = 1, 254
MEM_MIN, MEM_MAX = 128 * MiB, 512 * GiB
DEFAULT_MEM = 256 * MiB
MAX_DRIVES = 6
MAX_NICS = 2
# The machine whose devices are on PCI: StratoVirt 2.x's standard VM, q35 on x86_64 and
# virt on aarch64 (as QEMU's).
PCI_MACHINE = "q35" if MACHINE == "x86_64" else "virt"
PHYSICAL_SLOT_MAX = (1 << 13) - 1     # Slot Capabilities' 13-bit Physical Slot Number (PCIe 4.0, 7.5.3.9)
# Xen's domain ids below DOMID_FIRST_RESERVED (0x7ff0); 0 is the host's.
XEN_DOMID_MIN, XEN_DOMID_MAX = 1, 0x7FEF
VSOCK_MIN_CID = 3               # 0-2 are reserved (hypervisor, local, host)
VSOCK_MAX_CID = 0xFFFFFFFE      # U32_MAX is VMADDR_CID_ANY


class ConfigError(AltoVirtError, ValueError):
    """Invalid configuration; the message names the option and what is accepted."""

    exit_status = EXIT_USAGE


IO_ENGINES = ("Sync", "Async")    # Firecracker's names for a drive's I/O engine


@dataclass(frozen=True)
class TokenBucketConfig:
    """Firecracker's token bucket (src/vmm/src/rate_limiter): ``size`` tokens (bytes or
    operations), refilled from empty to full in ``refill_time`` ms, and ``one_time_burst``
    tokens more at the start that are never refilled."""

    size: int
    refill_time: int
    one_time_burst: int = 0


@dataclass(frozen=True)
class RateLimiterConfig:
    """A device's rate limiter: a bucket of bytes, one of operations, or both."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None


@dataclass
class DriveConfig:
    id: str
    path: str
    read_only: bool = False
    direct: bool = True
    serial: str | None = None
    io_engine: str = "Sync"     # Firecracker's: Sync (the worker pool) or Async
    rate_limiter: RateLimiterConfig | None = None


@dataclass
class NetConfig:
    id: str
    tap: str                    # the host tap's name ("" when it comes as ``fd``)
    mac: str | None = None
    vhost: bool = False         # the host kernel serves the queues (vhost-net)
    fd: int | None = None       # a tap the caller opened and passed, by descriptor number
    vhost_fd: int | None = None     # /dev/vhost-net, opened and passed by the caller
    rx_rate_limiter: RateLimiterConfig | None = None    # frames to the guest
    tx_rate_limiter: RateLimiterConfig | None = None    # frames from the guest


@dataclass
class ConsoleConfig:
    id: str
    socket_path: str


@dataclass
class VsockConfig:
    id: str
    guest_cid: int
    # The hybrid vsock's unix socket (Firecracker's uds_path); guest connections to
    # host port P go to "<uds_path>_P". Default: <tmpdir>/altovirt-<id>.vsock.
    uds_path: str | None = None
    vhost: bool = False         # the host kernel's vhost-vsock instead: AF_VSOCK on the host
    vhost_fd: int | None = None     # /dev/vhost-vsock, opened and passed by the caller


@dataclass
class FsConfig:
    """virtio-fs: the guest mounts ``tag``; a vhost-user back end (virtiofsd) listening on
    ``socket_path`` serves it."""

    id: str
    tag: str
    socket_path: str


@dataclass
class RngConfig:
    id: str
    max_bytes: int | None = None    # at most this many bytes per period (QEMU's max-bytes)
    period_ms: int = 1000
    rate_limiter: RateLimiterConfig | None = None       # Firecracker's, for its entropy device


PAGES_PER_MIB = 256                     # a balloon counts 4 KiB pages (virtio 1.2, 5.5.6)


@dataclass
class BalloonConfig:
    """A virtio-balloon (Firecracker's /balloon): its target, in MiB, whether the guest may take
    pages back when it runs out of memory, how often (s) it reports statistics (0: never),
    whether it reports free pages (VIRTIO_BALLOON_F_REPORTING) and whether it hints them when
    asked (VIRTIO_BALLOON_F_FREE_PAGE_HINT)."""

    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_polling_interval_s: int = 0
    free_page_reporting: bool = False
    free_page_hinting: bool = False


MMDS_ADDRESS = "169.254.169.254"       # Firecracker's default (mmds/ns.rs)
MMDS_SIZE_LIMIT = 51200                 # bytes: the API's largest body, Firecracker's default
MMDS_VERSIONS = ("V1", "V2")


@dataclass
class MmdsConfig:
    """The metadata service (Firecracker's MMDS): its version, the NICs the guest reaches it
    on, at which address, and its document (None before any is put; the running VM's store
    keeps this up to date, so a snapshot holds the document of its moment)."""

    network_interfaces: list[str] = field(default_factory=list)
    version: str = "V1"
    ipv4_address: str = MMDS_ADDRESS
    imds_compat: bool = False
    size_limit: int = MMDS_SIZE_LIMIT
    data: Any = None


@dataclass
class RootPortConfig:
    """A pcie-root-port on bus 0 (its devfn is in ``VmConfig.pci_slots`` under its id): its
    hot-plug slot's Physical Slot Number in chassis ``chassis``, its port number, and the
    device put into it at start (None: empty, for device_add)."""

    slot: int = 0
    port: int = 0
    chassis: int = 0
    device: str | None = None


@dataclass(frozen=True)
class MigrationUri:
    """Where a migration goes or comes from: ``file`` (a snapshot directory, or with
    ``memory`` the state file and the memory file), ``tcp`` (host, port) or ``unix``
    (socket path)."""

    kind: str
    path: str = ""                  # file, unix
    memory: str = ""                # file: the memory file, ``path`` being the state file
    host: str = ""                  # tcp
    port: int = 0

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"{self.kind}:{self.path}"


@dataclass
class IncomingConfig:
    """-incoming: load the VM instead of booting it (``uri`` None: wait for QMP migrate-incoming)."""

    uri: MigrationUri | None
    resume: bool = False            # run once loaded, instead of waiting paused for 'cont'
    map_memory: bool = True         # a snapshot's memory mapped copy-on-write, not read in


# CPU templates (Firecracker's; read by cpu_template.py, applied by the architecture)
@dataclass(frozen=True)
class BitFilter:
    """Bits to set (``filter``, 1 where the template decides) to ``value``; the rest kept."""

    filter: int
    value: int

    def apply(self, old: int) -> int:
        return (old & ~self.filter) | self.value

    def bitmap(self, bits: int) -> str:
        """Firecracker's form: every bit written out, ``x`` where the template leaves it."""
        return "0b" + "".join("x" if not self.filter >> i & 1 else str(self.value >> i & 1)
                              for i in reversed(range(bits)))


@dataclass(frozen=True)
class CpuidModifier:
    """x86_64: CPUID ``leaf``/``subleaf``'s registers filtered; its KVM flags become ``flags``."""

    leaf: int
    subleaf: int
    flags: int
    registers: tuple[tuple[str, BitFilter], ...]


@dataclass(frozen=True)
class RegisterModifier:
    """An MSR's index (x86_64) or a ``KVM_REG_*`` id (arm64), and its filter."""

    addr: int
    bitmap: BitFilter


VCPU_INIT_WORDS = 7                 # struct kvm_vcpu_init's features[7] (arm64 asm/kvm.h)


@dataclass(frozen=True)
class VcpuFeatures:
    """arm64: word ``index`` of KVM_ARM_VCPU_INIT's features, filtered."""

    index: int
    bitmap: BitFilter


@dataclass(frozen=True)
class CpuTemplate:
    """A custom template, parsed. ``kvm_capabilities``: KVM_CAP_* numbers the VM also needs,
    and (negated, ``~cap``) those it can do without."""

    kvm_capabilities: tuple[int, ...] = ()
    cpuid_modifiers: tuple[CpuidModifier, ...] = ()
    msr_modifiers: tuple[RegisterModifier, ...] = ()
    vcpu_features: tuple[VcpuFeatures, ...] = ()
    reg_modifiers: tuple[RegisterModifier, ...] = ()


# A machine's template: a static one's name, a custom one, or None.
CpuTemplateSpec = str | CpuTemplate | None


@dataclass
class VmConfig:
    kernel: str | None = None
    cmdline: str = ""
    initrd: str | None = None
    name: str = "altovirt"
    uuid: str | None = None
    vcpus: int = 1
    mem_size: int = DEFAULT_MEM
    omit_vm_memory: bool = False
    mem_share: bool = False              # RAM a shared memfd, for vhost-user back ends
    # ACPI tables (x86_64's; off: the MP table and the command line only); an arm64 VM has its
    # device tree instead.
    acpi: bool = MACHINE == "x86_64"
    # The virtio devices on a PCIe host bridge (-machine q35, Firecracker's --enable-pci), not
    # virtio-mmio; pci_slots: where the command line put them (and the root ports), device id ->
    # devfn on bus 0; root_ports: the PCIe root ports, by id.
    pci: bool = False
    pci_slots: dict[str, int] = field(default_factory=dict)
    root_ports: dict[str, RootPortConfig] = field(default_factory=dict)
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    console: ConsoleConfig | None = None
    vsock: VsockConfig | None = None
    rng: RngConfig | None = None
    mmds: MmdsConfig | None = None
    balloon: BalloonConfig | None = None
    fs: FsConfig | None = None
    cpu_template: CpuTemplateSpec = None  # a static template's name, or a custom one
    serial_stdio: bool = False
    serial_out_path: str | None = None   # with serial_stdio: output here, not to stdout (Firecracker's)
    serial_rate_limiter: TokenBucketConfig | None = None    # bytes of output; past it dropped
    api_channel: str | None = None
    vcpu_thread_name: str = "vcpu{}"     # {}: the index (Firecracker's front end names them its way)
    xenstore: str | None = None          # the host's XenStore socket
    xen_domid: int = 1                   # the guest's XenStore domain id
    incoming: IncomingConfig | None = None
    log_file: str | None = None
    log_stderr: bool = False             # -D alone: the log on stderr
    pidfile: str | None = None
    daemonize: bool = False
    seccomp: bool = True
    debug: bool = False
