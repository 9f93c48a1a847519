"""The architecture interface: all that vmm/ asks of the host's architecture, in one place.

vmm/ imports these names from here, never from an architecture's own modules; the
devices and the ACPI encoder import nothing of arch. Each architecture is a package
beside this file that provides every name (x86_64, aarch64), picked by
``os.uname().machine``, which is what platform.machine() answers, without importing
platform at start-up.

KVM
    REQUIRED_CAPS                           the KVM_CAP_* names the machine relies on
Memory layout
    BOARD                                   the board's own MMIO devices by name ("uart", "rtc",
                                            "gpio", "boot-timer"): base, size, interrupt line;
                                            a PC's are on port I/O, and it has none
    POWER_BUTTON_LINE                       the GPIO line of the board's power button (None: a
                                            PC's is ACPI's)
    ram_regions(size) -> list[Region]       guest RAM of ``size`` bytes, around the MMIO holes
    mmio_slot(index) -> (base, size, gsi)   virtio-mmio slot ``index``: its window and its
                                            interrupt; IndexError past the last slot
    VMGENID_ADDR                            the VM generation ID's reserved page (None: the
                                            machine has none)
    pci_layout(regions) -> PciLayout | None where a PCIe host bridge's ECAM and BAR windows go
                                            around RAM ``regions`` (None: the machine has none)
The VM and its vCPUs
    create_irqchip(vm, cpus, ram_end, pci=) -> irqchip
                                            the in-kernel interrupt controllers: after guest RAM
                                            is registered, before any vCPU; KvmError. Returns
                                            what the firmware describes of them (an arm64
                                            board's GIC version and regions; None on a PC)
    irqchip_routes() -> [(gsi, chip, pin)]  the GSI routes KVM gives the in-kernel controllers,
                                            which a routing table of one's own must keep
    cpu_template(spec, kvm) -> CpuTemplate  the CPU template a VM starts with: a static one's
                                            modifiers, once it is known to suit the host's CPU;
                                            VmmError in Firecracker's words if it does not
    setup_vcpus(kvm, vcpus, template) -> list[int]
                                            every vCPU's CPU model (``template`` applied) and
                                            power-on registers; returns the registers the
                                            power-on state keeps; VmmError if KVM lacks what
                                            the template changes
    setup_boot_regs(vcpu, plan)             the boot vCPU at the kernel's entry
    read_clock(vm, vcpus) -> int            the guest's clock, held across a pause
    write_clock(vm, vcpus, value)           and set back, so the guest sees no jump
Firmware and kernel
    FirmwareDevices                         what the devices hand the firmware, each describing
                                            itself (DSDT entries and the FADT's plain data)
    build_firmware(cpus, devices, irqchip) -> Firmware
    load_kernel(mem, image, cmdline, initrd, cpus, firmware) -> BootPlan
                                            the kernel, initrd, command line, firmware and boot
                                            structures in guest RAM; KernelError if it cannot boot
KVM's state (a reset's power-on state, a snapshot's "kvm" section)
    PowerOnState                            the VM's and its vCPUs' state as plain data
    save_state(vm, vcpus, registers) -> PowerOnState
    restore_state(vm, vcpus, state, *, reset=False)    SavedStateError if it does not fit
    snapshot_registers(kvm, vcpu) -> list[int]         the registers a snapshot keeps
    host_cpu(kvm, vcpu, template) -> dict   the host CPU as a snapshot's header records it: what
                                            it gives a guest through ``template``
    check_cpu(saved, here)                  SavedStateError unless a guest saved on ``saved``
                                            can run on ``here``
"""

from __future__ import annotations

import os

MACHINE = os.uname().machine

if MACHINE == "x86_64":
    from .x86_64 import (
        BOARD,
        POWER_BUTTON_LINE,
        REQUIRED_CAPS,
        VMGENID_ADDR,
        BootPlan,
        Firmware,
        FirmwareDevices,
        KernelError,
        PowerOnState,
        build_firmware,
        check_cpu,
        cpu_template,
        create_irqchip,
        host_cpu,
        irqchip_routes,
        load_kernel,
        mmio_slot,
        pci_layout,
        ram_regions,
        read_clock,
        restore_state,
        save_state,
        setup_boot_regs,
        setup_vcpus,
        snapshot_registers,
        write_clock,
    )
elif MACHINE == "aarch64":
    from .aarch64 import (  # type: ignore[assignment]
        BOARD,
        POWER_BUTTON_LINE,
        REQUIRED_CAPS,
        VMGENID_ADDR,
        BootPlan,
        Firmware,
        FirmwareDevices,
        KernelError,
        PowerOnState,
        build_firmware,
        check_cpu,
        cpu_template,
        create_irqchip,
        host_cpu,
        irqchip_routes,
        load_kernel,
        mmio_slot,
        pci_layout,
        ram_regions,
        read_clock,
        restore_state,
        save_state,
        setup_boot_regs,
        setup_vcpus,
        snapshot_registers,
        write_clock,
    )
else:
    raise ImportError(f"AltoVirt runs on x86_64 and aarch64 hosts; this one is {MACHINE}")

__all__ = [
    "BOARD",
    "MACHINE",
    "POWER_BUTTON_LINE",
    "REQUIRED_CAPS",
    "VMGENID_ADDR",
    "BootPlan",
    "Firmware",
    "FirmwareDevices",
    "KernelError",
    "PowerOnState",
    "build_firmware",
    "check_cpu",
    "cpu_template",
    "create_irqchip",
    "host_cpu",
    "irqchip_routes",
    "load_kernel",
    "mmio_slot",
    "pci_layout",
    "ram_regions",
    "read_clock",
    "restore_state",
    "save_state",
    "setup_boot_regs",
    "setup_vcpus",
    "snapshot_registers",
    "write_clock",
]
