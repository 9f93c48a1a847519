"""virtio-mmio devices end to end: the probe's polling drivers against AltoVirt and QEMU."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from altovirt.arch.x86_64 import layout
from altovirt.devices.virtio import device as vdev
from altovirt.devices.virtio import mmio, queue
from altovirt.devices.virtio.rng import Rng
from altovirt.eventloop import EventLoop
from altovirt.memory import GuestMemory

from .cabi import c_values, needs_gcc
from .conftest import Vm, needs_kvm, needs_qemu, run_altovirt, run_qemu


@pytest.fixture
def transport() -> Iterator[mmio.MmioTransport]:
    mem = GuestMemory(layout.ram_regions(1 << 20))
    irqfd = os.eventfd(0, os.EFD_NONBLOCK)
    t = mmio.MmioTransport(Rng("rng0"), mem, irqfd, EventLoop())
    yield t
    t.close()
    mem.close()
    os.close(irqfd)


def test_interrupt_registers_do_not_wait_for_queue_work(transport: mmio.MmioTransport) -> None:
    """A vCPU taking an interrupt reads InterruptStatus and writes InterruptACK while the
    I/O thread may hold the transport's lock for queue work; those two never wait for it."""
    t = transport
    t.interrupt.trigger(vdev.VIRTIO_MMIO_INT_VRING)
    seen: list[int] = []

    def vcpu() -> None:
        seen.append(t.read(mmio.INTERRUPT_STATUS, 4))
        t.write(mmio.INTERRUPT_ACK, 4, vdev.VIRTIO_MMIO_INT_VRING)
        seen.append(t.read(mmio.INTERRUPT_STATUS, 4))

    try:
        with t.lock:                # the I/O thread, busy with a queue
            reader = threading.Thread(target=vcpu)
            reader.start()
            reader.join(5)
            waited = reader.is_alive()
        assert not waited and seen == [vdev.VIRTIO_MMIO_INT_VRING, 0]
    finally:
        reader.join()


def test_status_read_acknowledges_when_kvm_absorbs_the_ack(transport: mmio.MmioTransport) -> None:
    """KVM absorbs InterruptACK in every slot the VMM builds, so InterruptStatus clears as the
    driver reads it, but for the bits the kernel keeps raising."""
    t = transport
    t.interrupt.trigger(vdev.VIRTIO_MMIO_INT_CONFIG)
    assert [t.read(mmio.INTERRUPT_STATUS, 4) for _ in range(2)] == [vdev.VIRTIO_MMIO_INT_CONFIG, 0]
    t.interrupt.stick(vdev.VIRTIO_MMIO_INT_VRING)         # vhost serves the queues
    t.interrupt.trigger(vdev.VIRTIO_MMIO_INT_CONFIG)
    assert [t.read(mmio.INTERRUPT_STATUS, 4) for _ in range(2)] == [3, vdev.VIRTIO_MMIO_INT_VRING]
    t.interrupt.stick(0)                                  # and stops
    assert t.read(mmio.INTERRUPT_STATUS, 4) == 0


@needs_gcc
def test_constants_match_linux_headers() -> None:
    ours = {
        "VIRTIO_MMIO_MAGIC_VALUE": mmio.MAGIC_VALUE, "VIRTIO_MMIO_VERSION": mmio.VERSION,
        "VIRTIO_MMIO_DEVICE_ID": mmio.DEVICE_ID, "VIRTIO_MMIO_VENDOR_ID": mmio.VENDOR_ID,
        "VIRTIO_MMIO_DEVICE_FEATURES": mmio.DEVICE_FEATURES,
        "VIRTIO_MMIO_DEVICE_FEATURES_SEL": mmio.DEVICE_FEATURES_SEL,
        "VIRTIO_MMIO_DRIVER_FEATURES": mmio.DRIVER_FEATURES,
        "VIRTIO_MMIO_DRIVER_FEATURES_SEL": mmio.DRIVER_FEATURES_SEL,
        "VIRTIO_MMIO_QUEUE_SEL": mmio.QUEUE_SEL, "VIRTIO_MMIO_QUEUE_NUM_MAX": mmio.QUEUE_NUM_MAX,
        "VIRTIO_MMIO_QUEUE_NUM": mmio.QUEUE_NUM, "VIRTIO_MMIO_QUEUE_READY": mmio.QUEUE_READY,
        "VIRTIO_MMIO_QUEUE_NOTIFY": mmio.QUEUE_NOTIFY,
        "VIRTIO_MMIO_INTERRUPT_STATUS": mmio.INTERRUPT_STATUS,
        "VIRTIO_MMIO_INTERRUPT_ACK": mmio.INTERRUPT_ACK, "VIRTIO_MMIO_STATUS": mmio.STATUS,
        "VIRTIO_MMIO_QUEUE_DESC_LOW": mmio.QUEUE_DESC_LOW,
        "VIRTIO_MMIO_QUEUE_DESC_HIGH": mmio.QUEUE_DESC_HIGH,
        "VIRTIO_MMIO_QUEUE_AVAIL_LOW": mmio.QUEUE_DRIVER_LOW,
        "VIRTIO_MMIO_QUEUE_AVAIL_HIGH": mmio.QUEUE_DRIVER_HIGH,
        "VIRTIO_MMIO_QUEUE_USED_LOW": mmio.QUEUE_DEVICE_LOW,
        "VIRTIO_MMIO_QUEUE_USED_HIGH": mmio.QUEUE_DEVICE_HIGH,
        "VIRTIO_MMIO_SHM_SEL": mmio.SHM_SEL, "VIRTIO_MMIO_SHM_LEN_LOW": mmio.SHM_LEN_LOW,
        "VIRTIO_MMIO_SHM_BASE_HIGH": mmio.SHM_BASE_HIGH,
        "VIRTIO_MMIO_CONFIG_GENERATION": mmio.CONFIG_GENERATION,
        "VIRTIO_MMIO_CONFIG": mmio.CONFIG, "VIRTIO_MMIO_INT_VRING": vdev.VIRTIO_MMIO_INT_VRING,
        "VIRTIO_MMIO_INT_CONFIG": vdev.VIRTIO_MMIO_INT_CONFIG,
        "VIRTIO_CONFIG_S_ACKNOWLEDGE": mmio.ACKNOWLEDGE, "VIRTIO_CONFIG_S_DRIVER": mmio.DRIVER,
        "VIRTIO_CONFIG_S_DRIVER_OK": mmio.DRIVER_OK, "VIRTIO_CONFIG_S_FEATURES_OK": mmio.FEATURES_OK,
        "VIRTIO_CONFIG_S_NEEDS_RESET": mmio.DEVICE_NEEDS_RESET, "VIRTIO_CONFIG_S_FAILED": mmio.FAILED,
        "VIRTIO_F_VERSION_1": vdev.VIRTIO_F_VERSION_1,
        "VIRTIO_RING_F_INDIRECT_DESC": queue.VIRTIO_F_INDIRECT_DESC,
        "VIRTIO_RING_F_EVENT_IDX": queue.VIRTIO_F_EVENT_IDX,
        "VRING_DESC_F_NEXT": queue.VIRTQ_DESC_F_NEXT, "VRING_DESC_F_WRITE": queue.VIRTQ_DESC_F_WRITE,
        "VRING_DESC_F_INDIRECT": queue.VIRTQ_DESC_F_INDIRECT,
        "VRING_AVAIL_F_NO_INTERRUPT": queue.VIRTQ_AVAIL_F_NO_INTERRUPT,
        "VRING_USED_F_NO_NOTIFY": queue.VIRTQ_USED_F_NO_NOTIFY,
        "VIRTIO_ID_NET": vdev.VIRTIO_ID_NET, "VIRTIO_ID_BLOCK": vdev.VIRTIO_ID_BLOCK,
        "VIRTIO_ID_CONSOLE": vdev.VIRTIO_ID_CONSOLE, "VIRTIO_ID_RNG": vdev.VIRTIO_ID_RNG,
        "VIRTIO_ID_VSOCK": vdev.VIRTIO_ID_VSOCK, "sizeof(struct vring_desc)": queue.DESC_SIZE,
    }
    headers = ("linux/virtio_mmio.h", "linux/virtio_config.h", "linux/virtio_ring.h", "linux/virtio_ids.h")
    assert c_values(headers, tuple(ours)) == ours


@needs_kvm
def test_rng(probe: Path) -> None:
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-device", "virtio-rng,id=rng0",
                       "-append", "probe.run=rng", "-serial", "stdio")
    assert run.returncode == 0, run.stderr
    assert "virtio_mmio.device=4K@0xd0000000:5" in run.report.values["cmdline"]
    line = run.report.line("rng irq=")
    assert line.startswith("rng irq=5 bytes=4096 nonzero=") and line.endswith(" isr=0x1 after-ack=0x0")
    assert run.report.tests == {"rng": "ok"}


@needs_kvm
def test_rng_without_device_fails_cleanly(probe: Path) -> None:
    run = run_altovirt("-kernel", str(probe / "probe.elf"), "-append", "probe.run=rng", "-serial", "stdio")
    assert run.returncode == 0
    assert run.report.line("rng") == "rng no device" and run.report.tests == {"rng": "fail"}


@needs_kvm
@pytest.mark.parametrize("limit, min_seconds", [("max-bytes=2048,period=250", 0.7), (None, 0.0)])
def test_rng_rate_limit(probe: Path, vms: list[Vm], limit: str | None, min_seconds: float) -> None:
    device = "virtio-rng" + (f",{limit}" if limit else "")
    vm = Vm("-kernel", str(probe / "probe.elf"), "-device", device, "-append", "probe.run=rng-rate",
            "-serial", "stdio")
    vms.append(vm)
    start = vm.wait_line("probe: rng-rate start")
    done = vm.wait_line("probe: rng-rate done bytes=8192")
    assert vm.finish()[0] == 0
    # 8 KiB at 2 KiB per 250 ms needs three more periods after the first.
    assert done - start >= min_seconds
    if limit is None:
        assert done - start < 0.7


@needs_qemu
def test_rng_agrees_with_qemu(probe: Path) -> None:
    qr = run_qemu(probe / "probe.elf", "probe.run=rng", devices=("virtio-rng-device",)).report
    a = run_altovirt("-kernel", str(probe / "probe.elf"), "-device", "virtio-rng", "-append", "probe.run=rng",
                     "-serial", "stdio")
    assert qr.tests == a.report.tests == {"rng": "ok"}
    for r in (qr, a.report):
        assert " bytes=4096 " in r.line("rng irq=") and r.line("rng irq=").endswith("isr=0x1 after-ack=0x0")
