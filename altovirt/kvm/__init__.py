"""Thin, typed access to the KVM API: structures, ioctl numbers and fd wrappers."""

from .system import Device, Kvm, KvmError, Vcpu, Vm, ioctl

__all__ = ["Device", "Kvm", "KvmError", "Vcpu", "Vm", "ioctl"]
