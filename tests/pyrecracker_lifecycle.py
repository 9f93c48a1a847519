"""Drives altovirt-firecracker with pyrecracker (PyPI), a Firecracker client library, through a
whole lifecycle, as its users write it: configure, start, pause, snapshot, resume, stop, then
load the snapshot in a new VMM, pause, resume and stop. pyrecracker runs ``sudo firecracker``
from PATH and creates its tap with ``ip``: run this in a network namespace, with a directory
on PATH whose ``firecracker`` is AltoVirt's. It prints what it saw, a line a step.

    pyrecracker_lifecycle.py WORKDIR KERNEL DISK
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from pathlib import Path

from pyrecracker.client_types import SnapshotType
from pyrecracker.vm import VMManager


def wait_for(log: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        for line in content.split("\n")[:-1]:     # whole lines only: the console writes as it goes
            if line.startswith(text):
                return line
        time.sleep(0.05)
    raise AssertionError(f"{log}: never saw {text!r}")


def wait_socket(path: Path) -> None:
    """pyrecracker sends its first request without waiting for the socket."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            assert time.monotonic() < deadline, f"{path} never accepted a connection"
            time.sleep(0.01)


def get(sock: Path, path: str) -> object:
    """A GET of our own beside pyrecracker's calls, to see the VM's state."""
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(sock))
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def main() -> None:
    work, kernel, disk = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    sock, log = work / "fc.sock", work / "fc.log"
    vm = VMManager(socket_path=str(sock), kernel_image_path=kernel, firecracker_logs_path=str(log))
    wait_socket(sock)
    vm.boot_args = "console=ttyS0 reboot=k panic=1 pci=off probe.run=snapshot"
    vm.vcpu_count, vm.mem_size_mib = 2, 128
    vm.path_on_host = disk
    vm.host_dev_name, vm.host_ip, vm.guest_ip = "tap0", "172.16.0.1", "172.16.0.2"
    vm.configure()
    vm.start()
    print(wait_for(log, "probe: cmdline="), flush=True)
    wait_for(log, "probe: snap ready blk=1")
    vm.pause()
    vm.create_snapshot(snapshot_path=str(work / "vm.state"), mem_file_path=str(work / "vm.mem"),
                       snapshot_type=SnapshotType.FULL)
    vm.resume()
    vm.host_env_cleanup_pause = 0
    vm.stop()
    print("first VMM stopped", flush=True)

    log2 = work / "fc2.log"
    vm2 = VMManager(socket_path=str(sock), kernel_image_path=kernel, firecracker_logs_path=str(log2))
    wait_socket(sock)
    vm2.host_dev_name, vm2.host_ip, vm2.guest_ip = "tap0", "172.16.0.1", "172.16.0.2"
    vm2.setup_host_networking()
    vm2.load_snapshot(snapshot_path=str(work / "vm.state"), mem_file_path=str(work / "vm.mem"),
                      resume_vm=True)
    print("loaded", json.dumps(get(sock, "/")), flush=True)
    vm2.pause()
    print("paused", json.dumps(get(sock, "/")), flush=True)
    vm2.resume()
    print("config", json.dumps(get(sock, "/vm/config")), flush=True)
    vm2.host_env_cleanup_pause = 0
    vm2.stop()
    print("second VMM stopped", flush=True)


if __name__ == "__main__":
    main()
