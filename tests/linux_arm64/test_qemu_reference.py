"""The reference on arm64: QEMU's virt machine boots the same kernel and initramfs on the same
KVM, with a disk and a NIC, and Linux uses both; so a failure under AltoVirt is AltoVirt's."""

from ..linux import test_qemu_reference as shared

pytestmark = shared.pytestmark
test_qemu_virt_boots_with_disk_and_net = shared.test_qemu_microvm_boots_with_disk_and_net
