"""What differs between the test bed's architectures: one :class:`Arch` per kind of L1.

The x86_64 bed (the default) boots Debian's amd64 kernel in ``qemu-system-x86_64`` with
emulated AMD SVM and shares the host's own root with it.  The aarch64 bed boots Debian's
arm64 kernel in ``qemu-system-aarch64 -M virt,virtualization=on,gic-version=3``: the kernel
starts at EL2 and so offers KVM (built in, VHE, with a vGICv3), and its root is an arm64
userland built from Debian's packages (tests/testbed/userland.py), since the host's binaries
are x86.  Everything else (the two boot stages, the ports, the watch over L1) is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One kind of L1 and of the Linux guests (L2) booted inside it.

    ``name`` is the kernel's (``uname -m``), ``deb`` Debian's architecture; ``native`` says
    whether the host's own root can be L1's (else :mod:`.userland` builds one).
    """

    name: str
    deb: str
    native: bool
    qemu: str                       # the QEMU binary that runs L1
    qemu_package: str               # the Debian package that has it, for messages
    machine: tuple[str, ...]        # QEMU arguments: machine, CPU and accelerator
    kernel_meta: str                # the meta-package naming the current kernel image
    l1_modules: tuple[str, ...]     # L1's modules, loaded in this order (with dependencies)
    l1_module_params: Mapping[str, str]
    cmdline: str                    # L1's kernel command line
    guest_modules: tuple[str, ...]  # what the L2 initramfs loads (initramfs.build's default)
    gcc: str                        # compiles the L2 guest's C programs (static)
    guest_append: str               # the L2 guest's command line: its console, where init drives it
    # Asked of QEMU's monitor when L1 wedged, and what nudges a silent L1 (watch.py).
    wedge_queries: tuple[str, ...] = ("info registers", "info registers")
    nudge: tuple[str, ...] = ()
    variant: str = ""               # a second bed of one architecture: what sets it apart

    @property
    def key(self) -> str:
        """The bed's name: the architecture's, and its variant's."""
        return f"{self.name}-{self.variant}" if self.variant else self.name


X86_64 = Arch(
    name="x86_64", deb="amd64", native=True,
    qemu="qemu-system-x86_64", qemu_package="qemu-system-x86",
    machine=("-accel", "tcg", "-cpu", "max", "-M", "pc"),
    kernel_meta="linux-image-amd64",
    # What L1 needs, loaded in dependency order (modules.dep) by stage 1: virtio-pci for the
    # devices, 9p for the host's root and the output directory, overlay for a writable root,
    # virtio_console for the stdout/stderr/control ports, qemu_fw_cfg for the run script, and
    # what the guests under test use.
    l1_modules=("virtio_pci", "virtio_console", "qemu_fw_cfg", "9pnet_virtio", "9p",
                "overlay", "tun", "kvm_amd", "vhost_net", "vhost_vsock"),
    # kvm_amd.vgif=0: KVM then clears and sets GIF with real CLGI/STGI around VMRUN instead of
    # leaving it to TCG's young virtual-GIF emulation.  Measured with scripts/testbed-stress on
    # two L1 vCPUs, two L2 guests booting at a time: with vgif=1, 2 of 20 L2 boots reset
    # silently before printing anything (a failure nothing outside can tell from a VMM bug);
    # with vgif=0 the failures seen were mostly L1 oopses ("stack guard page was hit" in an L2
    # vCPU thread: exc_page_fault recursing on a %gs access, as if an interrupt came while L2's
    # GS base was loaded), which end L1 and so are detected and retried.  One L2 at a time,
    # both settings booted 20 of 20.
    l1_module_params={"kvm_amd": "vgif=0"},
    # Measured, none of these changes L1's boot time beyond the noise (about 8-11 s to "ready"
    # on 2 host cores either way); they are there for robustness.  quiet: less console output
    # through the emulated UART; tsc=reliable/no_timer_check: no clocksource watchdog and timer
    # checks, which TCG's irregular timing on a busy host can fail (falling back from the TSC
    # to the HPET makes every clock read an emulated MMIO access under QEMU's big lock);
    # mitigations=off: speculation workarounds only cost time in an emulator; panic=-1 with
    # -no-reboot: a panic ends QEMU at once; nokaslr: the same addresses in every L1 log, so
    # oopses can be compared across runs.  Not here: no5lvl (L1 on 4-level paging; -cpu max
    # offers LA57) did not stop the crashes described at l1.DEFAULT_CPUS.
    cmdline=("console=ttyS0 quiet loglevel=4 panic=-1 tsc=reliable no_timer_check mitigations=off "
             "nokaslr"),
    # Loaded by the L2 init in this order.  The buses (virtio_mmio, virtio_pci) first so the device drivers
    # that follow find their devices at once; evdev before button so acpid finds the power
    # button's event node; crc32c_generic for ext4's metadata checksums (a softdep busybox
    # modprobe does not follow; the SSE4.2 variant is left out as a CPU without SSE4.2 would
    # fail to load it).  af_packet, unix, ipv6, hw_random, the 8250 UART and the i8042 are
    # built into Debian's kernel.
    guest_modules=("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                   "vmw_vsock_virtio_transport", "crc32c_generic", "ext4", "evdev", "button"),
    gcc="gcc",
    # A serial console, no boot chatter, and a reset right after a panic, which ends AltoVirt
    # (and QEMU with -no-reboot); the driver fails at the panic message.
    guest_append="console=ttyS0 quiet panic=-1",
    # Where the vCPU is (L1's kernel is at fixed addresses with nokaslr, an L2 kernel
    # elsewhere) and what its local APIC holds.
    wedge_queries=("info registers", "info lapic", "info registers", "info lapic"),
    # A key press on the PS/2 keyboard, whose interrupt makes QEMU re-evaluate L1's local
    # APIC, so that a timer interrupt it left pending is delivered.  Seen once in the hog runs
    # of issue 24: L1 silent 21 s, its vCPU spinning in L2 (20.2 s of CPU), heartbeat back 2 s
    # after the nudge and the module passed.
    nudge=("sendkey shift",),
)

AARCH64 = Arch(
    name="aarch64", deb="arm64", native=False,
    qemu="qemu-system-aarch64", qemu_package="qemu-system-arm",
    # virtualization=on: the kernel is entered at EL2 and runs KVM in VHE mode; gic-version=3:
    # the GICv3's virtualization extension, which KVM needs for a vGIC.  pauth-impdef=on:
    # QEMU's cheap stand-in for the QARMA pointer-authentication cipher, which Debian's kernel
    # runs in nearly every function's prologue and epilogue, and which costs TCG a great deal
    # (the architected algorithm is irrelevant to what runs in L1).
    machine=("-accel", "tcg", "-cpu", "max,pauth-impdef=on",
             "-M", "virt,virtualization=on,gic-version=3"),
    kernel_meta="linux-image-arm64",
    # As on x86, less kvm_amd: arm64 KVM is built into Debian's kernel (CONFIG_KVM=y).
    l1_modules=("virtio_pci", "virtio_console", "qemu_fw_cfg", "9pnet_virtio", "9p",
                "overlay", "tun", "vhost_net", "vhost_vsock"),
    l1_module_params={},
    # ttyAMA0: the virt machine's PL011 UART (built in).  The x86-only timer parameters are
    # gone; the rest as on x86.
    cmdline="console=ttyAMA0 quiet loglevel=4 panic=-1 mitigations=off nokaslr",
    # The x86 list with gpio_keys for ACPI's button: on a device-tree machine the power button
    # is a gpio-keys node on the PL061 GPIO controller (built in, as is the ACPI button driver
    # for ACPI machines), reporting KEY_POWER through evdev to busybox acpid as on x86.
    guest_modules=("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                   "vmw_vsock_virtio_transport", "crc32c_generic", "ext4", "evdev", "gpio_keys"),
    gcc="aarch64-linux-gnu-gcc",
    # The board's PL011 is ttyAMA0, which tests/linux/guest/init must be told of.
    guest_append="console=ttyAMA0 quiet panic=-1 guest.console=ttyAMA0",
)

# The arm64 bed on a host whose GIC is a v2 (QEMU's virt emulates its virtualization
# extensions too): KVM there has no GICv3 to give a guest, so AltoVirt's board falls back to
# a GICv2.
AARCH64_GICV2 = dataclasses.replace(
    AARCH64, variant="gicv2",
    machine=("-accel", "tcg", "-cpu", "max,pauth-impdef=on", "-M", "virt,virtualization=on,gic-version=2"))

ARCHES: Mapping[str, Arch] = {a.key: a for a in (X86_64, AARCH64, AARCH64_GICV2)}


def get(name: str) -> Arch:
    """The :class:`Arch` called ``name`` (``x86_64``, ``aarch64``, ``aarch64-gicv2``; Debian's
    ``amd64`` and ``arm64`` too); ValueError naming the known ones otherwise."""
    for a in ARCHES.values():
        if name == a.key or (name == a.deb and not a.variant):
            return a
    raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHES)})")
