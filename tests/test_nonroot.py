"""AltoVirt run by an ordinary user: one that can open /dev/kvm through a "kvm" group, as
Debian's udev rules set it up, and owns its files and its tap. Every device and the QMP
socket work, with seccomp on, and the process holds no capability.

This host's /dev/kvm is root's alone, so the test gives the user a kvm group the way a
host would, but only in a private mount namespace: a node with the same device number,
group-owned and mode 0660, bind-mounted over /dev/kvm (and a 0666 /dev/net/tun, Debian's
mode). The interpreter is Debian's /usr/bin/python3, since the venv's is under /root,
which other users cannot enter.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import KVM_PROBLEM, ROOT, Vm
from .netns import NetNs, needs_netns
from .test_jailer import NO_CAPS, status
from .test_qmp import Raw
from .test_virtio_console import talk

USER, KVM_GROUP = 4242, 4243
SYSTEM_PYTHON = "/usr/bin/python3"


def _problem() -> str | None:
    if KVM_PROBLEM or os.geteuid() != 0:
        return KVM_PROBLEM or "SKIPPED LOUDLY: setting up an ordinary user's view of /dev/kvm needs root"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"SKIPPED LOUDLY: util-linux {tool} is missing; the non-root test cannot start the VMM"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return (f"SKIPPED LOUDLY: {SYSTEM_PYTHON} (Debian python3) is missing; "
                "no interpreter that other users can run")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True).stdout.strip()
    if version != "True":
        return f"SKIPPED LOUDLY: {SYSTEM_PYTHON} is older than 3.11, which AltoVirt needs"
    return None


needs_user_setup = pytest.mark.skipif(_problem() is not None, reason=_problem() or "")


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the user owns (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="altovirt-user-"))
    os.chown(d, USER, USER)
    yield d
    shutil.rmtree(d)


def device_node(where: Path, host: str, group: int, mode: int) -> Path:
    node = where / os.path.basename(host)
    os.mknod(node, stat.S_IFCHR | mode, os.stat(host).st_rdev)
    os.chown(node, 0, group)
    os.chmod(node, mode)                                # mknod's mode is filtered by the umask
    return node


@needs_user_setup
@needs_netns
def test_ordinary_user_runs_every_device(probe: Path, home: Path, vms: list[Vm]) -> None:
    nodes = home / "nodes"
    nodes.mkdir()
    kvm = device_node(nodes, "/dev/kvm", KVM_GROUP, 0o660)
    tun = device_node(nodes, "/dev/net/tun", 0, 0o666)
    files = home / "vm"
    files.mkdir()
    disk, spare = files / "disk.img", files / "spare.img"
    for image in (disk, spare):
        image.write_bytes(bytes(1 << 20))
    shutil.copy(probe / "probe.elf", files / "probe.elf")
    for p in files.iterdir():
        os.chown(p, USER, USER)
    os.chown(files, USER, USER)
    site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))   # seccompy, pure Python
    ns = NetNs(("tap0",), owner=USER)
    try:
        bind = 'mount --bind "$1" /dev/kvm && mount --bind "$2" /dev/net/tun && shift 2 && exec "$@"'
        launcher = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", bind, "sh",
                    str(kvm), str(tun), "nsenter", f"--net={ns.path}", "--",
                    "setpriv", f"--reuid={USER}", f"--regid={USER}", f"--groups={KVM_GROUP}",
                    "--inh-caps=-all", "--bounding-set=-all", "--",
                    "env", f"PYTHONPATH={ROOT}:{site}", "PYTHONDONTWRITEBYTECODE=1",
                    SYSTEM_PYTHON, "-m", "altovirt"]
        vm = Vm("-kernel", str(files / "probe.elf"), "-drive", f"id=d0,file={disk}",
                "-netdev", "id=n0,netdev=tap0", "-device", "virtio-rng",
                "-chardev", f"id=console0,path={files / 'console.sock'}",
                "-device", f"vsock,id=v0,guest-cid=3,uds-path={files / 'vsock.sock'}",
                "-api-channel", f"unix:{files / 'qmp.sock'}", "-D", str(files / "vm.log"),
                "-append", "probe.run=blk,net,rng,console,wait", "-serial", "stdio", launcher=launcher)
        vms.append(vm)
        vm.wait_line("probe: console ready")
        assert talk(files / "console.sock", second_client=True) == (b"pong ping from the host\n", b"")
        vm.wait_line("probe: waiting")
    finally:
        ns.close()
    assert "probe: test net ok" in vm.seen and "probe: test rng ok" in vm.seen
    blk0 = next(line for line in vm.seen if line.startswith("probe: blk0 "))
    assert " write=ok flush=ok readback=ok " in blk0

    st = status(vm.proc.pid)             # unshare, sh, nsenter, setpriv and env each exec the next
    assert st["Uid"].split() == [str(USER)] * 4 and st["Groups"] == str(KVM_GROUP)
    assert st["CapEff"] == st["CapPrm"] == NO_CAPS and st["Seccomp"] == "2"
    for sock in ("qmp.sock", "console.sock", "vsock.sock"):
        assert (files / sock).stat().st_uid == USER

    raw = Raw(files / "qmp.sock")
    for command in ("stop", "cont"):
        assert raw.call({"execute": command}) == {"return": {}}
    spare_file = {"driver": "file", "filename": str(spare)}
    assert raw.call({"execute": "blockdev-add", "arguments": {"node-name": "spare", "file": spare_file}}) == \
        {"return": {}}
    assert raw.call({"execute": "device_add", "arguments": {"id": "spare", "driver": "virtio-blk-mmio"}}) == \
        {"return": {}}
    assert raw.call({"execute": "quit"}) == {"return": {}}
    raw.close()
    assert vm.finish() == (0, "")
