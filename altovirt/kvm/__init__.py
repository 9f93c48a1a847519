"""Thin, typed access to the KVM API: structures, ioctl numbers and fd wrappers."""

from .system import Kvm, KvmError, Vcpu, Vm, ioctl

__all__ = ["Kvm", "KvmError", "Vcpu", "Vm", "ioctl"]
