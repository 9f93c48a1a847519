"""Debian's stock kernel as the guest: tests that need a /dev/kvm with hardware virtualization.
On PVM hosts tests/test_linux.py runs them inside the nested test bed (scripts/testbed)."""
