"""Legacy devices, the buses and per-vCPU CPUID, driven as a guest would drive them."""

from __future__ import annotations

import logging
import time

import pytest

from altovirt.arch.x86_64.cpuid import vcpu_cpuid
from altovirt.devices.bus import Bus, BusConflict
from altovirt.devices.legacy import serial as uart
from altovirt.devices.legacy.boottimer import MAX_MARKS, BootTimer
from altovirt.devices.legacy.i8042 import I8042
from altovirt.devices.legacy.rtc import Rtc
from altovirt.kvm import structs as S


class Recorder:
    def __init__(self) -> None:
        self.out = bytearray()
        self.irqs = 0

    def write(self, data: bytes) -> None:
        self.out += data

    def irq(self) -> None:
        self.irqs += 1


@pytest.fixture
def com() -> tuple[uart.Serial, Recorder]:
    rec = Recorder()
    return uart.Serial(rec.write, rec.irq), rec


def test_serial_transmit_and_thre_interrupt(com: tuple[uart.Serial, Recorder]) -> None:
    s, rec = com
    assert s.read(uart.LSR, 1) & uart.LSR_THRE
    for b in b"hi\n":
        s.write(uart.DATA, 1, b)
    assert rec.out == b"hi\n" and rec.irqs == 0          # THRI not enabled
    s.write(uart.IER, 1, uart.IER_THRI)
    assert rec.irqs == 1 and s.read(uart.IIR, 1) & 0x0F == uart.IIR_THRI
    assert s.read(uart.IIR, 1) & 0x0F == uart.IIR_NO_INT  # reading IIR acknowledged it
    s.write(uart.DATA, 1, ord("x"))
    assert rec.irqs == 2 and s.read(uart.IIR, 1) & 0x0F == uart.IIR_THRI


def test_serial_receive(com: tuple[uart.Serial, Recorder]) -> None:
    s, rec = com
    assert not s.read(uart.LSR, 1) & uart.LSR_DR
    s.write(uart.IER, 1, uart.IER_RDI)
    s.enqueue(b"ab")
    assert rec.irqs == 1
    assert s.read(uart.IIR, 1) & 0x0F == uart.IIR_RDI and s.read(uart.LSR, 1) & uart.LSR_DR
    assert bytes([s.read(uart.DATA, 1), s.read(uart.DATA, 1)]) == b"ab"
    assert not s.read(uart.LSR, 1) & uart.LSR_DR and s.read(uart.IIR, 1) & 0x0F == uart.IIR_NO_INT


def test_serial_rx_buffer_is_bounded(com: tuple[uart.Serial, Recorder]) -> None:
    s, _ = com
    s.enqueue(bytes(uart.RX_BUFFER_LIMIT + 100))
    n = 0
    while s.read(uart.LSR, 1) & uart.LSR_DR:
        s.read(uart.DATA, 1)
        n += 1
    assert n == uart.RX_BUFFER_LIMIT


def test_serial_divisor_fifo_and_loopback(com: tuple[uart.Serial, Recorder]) -> None:
    s, rec = com
    s.write(uart.LCR, 1, uart.LCR_DLAB | 3)
    s.write(uart.DATA, 1, 1)
    s.write(uart.IER, 1, 0)
    assert (s.read(uart.DATA, 1), s.read(uart.IER, 1)) == (1, 0)
    s.write(uart.LCR, 1, 3)
    s.write(uart.FCR, 1, uart.FCR_FIFO_ENABLE)
    assert s.read(uart.IIR, 1) & 0xC0 == 0xC0                        # a 16550A
    s.write(uart.MCR, 1, uart.MCR_LOOP | uart.MCR_RTS | uart.MCR_OUT2)
    assert s.read(uart.MSR, 1) == uart.MSR_CTS | uart.MSR_DCD         # Linux's loopback probe
    s.write(uart.DATA, 1, 0x5A)
    assert s.read(uart.DATA, 1) == 0x5A and rec.out == b""          # looped back, not sent


def test_i8042_reset_and_self_test() -> None:
    resets = []
    kbd = I8042(lambda: resets.append(1))
    kbd.write(4, 1, 0xAA)
    assert kbd.read(4, 1) & 1 and kbd.read(0, 1) == 0x55 and not kbd.read(4, 1) & 1
    kbd.write(4, 1, 0x60)
    kbd.write(0, 1, 0x47)
    kbd.write(4, 1, 0x20)
    assert kbd.read(0, 1) == 0x47
    assert not resets
    kbd.write(4, 1, 0xFE)
    assert resets == [1]


def test_rtc_reports_host_utc_in_bcd() -> None:
    rtc = Rtc(low_ram=512 << 20, high_ram=1 << 30)

    def reg(i: int) -> int:
        rtc.write(0, 1, i)
        return rtc.read(1, 1)

    def bcd(v: int) -> int:
        return (v >> 4) * 10 + (v & 0xF)

    t = time.gmtime()
    assert bcd(reg(0x09)) == t.tm_year % 100 and bcd(reg(0x32)) == t.tm_year // 100
    assert bcd(reg(0x08)) == t.tm_mon and bcd(reg(0x07)) == t.tm_mday
    assert reg(0x0B) == 0x02 and reg(0x0D) == 0x80 and not reg(0x0A) & 0x80
    assert reg(0x34) | reg(0x35) << 8 == (512 - 16) * 16          # 64 KiB units above 16 MiB
    assert reg(0x5B) | reg(0x5C) << 8 | reg(0x5D) << 16 == (1 << 30) >> 16
    rtc.write(0, 1, 0x80 | 0x40)                                   # NMI mask bit is ignored
    rtc.write(1, 1, 0x99)
    assert reg(0x40) == 0x99                                       # CMOS RAM keeps values


def test_bus_dispatch_and_conflicts() -> None:
    bus = Bus("pio")
    kbd = I8042(lambda: None)
    bus.insert(kbd, 0x60, 5)
    with pytest.raises(BusConflict):
        bus.insert(kbd, 0x64, 1)
    with pytest.raises(BusConflict):
        bus.insert(kbd, 0x5F, 2)
    bus.insert(kbd, 0x65, 1)
    assert bus.find(0x64) == (kbd, 4) and bus.find(0x66) is None
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 2) == 0xFFFF and bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 1, 0)                                        # unclaimed writes are dropped


def test_boot_timer_marks_and_scratch_semantics() -> None:
    t = BootTimer()
    t.write(0, 1, 0x01)
    t.write(0, 1, 0x102)
    assert [m.value for m in t.marks] == [0x01, 0x102] and t.read(0, 1) == 0x02
    assert 0 < t.marks[0].ms <= t.marks[1].ms < 600_000


def test_boot_timer_record_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A guest writing port 0x3ff in a loop grows neither the VMM's memory nor its log."""
    t = BootTimer()
    with caplog.at_level(logging.INFO, logger="altovirt.devices.legacy.boottimer"):
        for i in range(10 * MAX_MARKS):
            t.write(0, 1, i)
    assert [m.value for m in t.marks] == list(range(MAX_MARKS))
    assert t.unrecorded == 9 * MAX_MARKS and t.read(0, 1) == (10 * MAX_MARKS - 1) & 0xFF
    assert len(caplog.records) == MAX_MARKS + 1


def test_cpuid_topology() -> None:
    leaf = S.kvm_cpuid_entry2
    supported = [leaf(function=1, eax=0x800F10, ebx=0xFF00FF08, ecx=0, edx=1 << 28),
                 leaf(function=0xB, index=0), leaf(function=0xB, index=1), leaf(function=0xB, index=2),
                 leaf(function=0x80000008, ecx=0xFFFF), leaf(function=0x40000000, ebx=0x4B4D564B)]
    for index, count in ((0, 1), (3, 4)):
        table = {(e.function, e.index): e for e in vcpu_cpuid(supported, index, count)}
        one = table[(1, 0)]
        assert one.ebx >> 24 == index and (one.ebx >> 16) & 0xFF == count and one.ebx & 0xFF == 0x08
        assert one.ecx >> 31 == 1 and bool(one.edx >> 28 & 1) == (count > 1)
        assert table[(0xB, 0)].ebx == 1 and table[(0xB, 1)].ebx == count
        assert all(table[(0xB, i)].edx == index for i in range(3))
        assert table[(0x80000008, 0)].ecx & 0xFF == count - 1
        assert table[(0x40000000, 0)].ebx == 0x4B4D564B                  # KVM signature kept
    assert supported[0].ebx == 0xFF00FF08                                 # input left alone
