"""Every device, as Debian's arm64 drivers use it: tests/linux/test_devices.py's tests, on the
arm64 board (its device tree in place of ACPI, the PL061's power button for system_powerdown),
on the one VM they share. Named here in that module's order, which pytest runs them in (the
last powers the VM down)."""

from ..linux import test_devices as shared

pytestmark = shared.pytestmark
vm = shared.vm
test_vcpus_memory_and_virtio_mmio_devices = shared.test_vcpus_memory_and_virtio_mmio_devices
test_disk_read_write_serial = shared.test_disk_read_write_serial
test_readonly_disk_refuses_writes = shared.test_readonly_disk_refuses_writes
test_vhost_net_ping_and_tcp_both_ways = shared.test_vhost_net_ping_and_tcp_both_ways
test_shell_on_hvc0_through_the_console_socket = shared.test_shell_on_hvc0_through_the_console_socket
test_vsock_guest_to_host_and_host_to_guest = shared.test_vsock_guest_to_host_and_host_to_guest
test_rng = shared.test_rng
test_xenstore_from_a_linux_program = shared.test_xenstore_from_a_linux_program
test_stop_and_cont_hold_the_guest_clock = shared.test_stop_and_cont_hold_the_guest_clock
test_disk_hotplug_seen_by_linux = shared.test_disk_hotplug_seen_by_linux
test_nic_hotplug_seen_by_linux = shared.test_nic_hotplug_seen_by_linux
test_unplugged_vhost_net_nic_lets_go_of_its_vhost = shared.test_unplugged_vhost_net_nic_lets_go_of_its_vhost
test_system_powerdown_is_a_clean_shutdown = shared.test_system_powerdown_is_a_clean_shutdown
