"""Command line and JSON configuration: every option parsed, every bad input a
one-line error with exit status 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from altovirt.config import ConfigError, load_config
from altovirt.config.cmdline import parse
from altovirt.config.keys import KeyProblem, Problem, check_keys, find_key_problem
from altovirt.config.model import MiB, RateLimiterConfig, TokenBucketConfig

from .conftest import ROOT, altovirt_cmd

KERNEL = str(ROOT / "pyproject.toml")       # any readable file will do before boot


def usage_error(*args: str) -> str:
    """Run altovirt with ``args``; assert exit 2 and one line on stderr; return it."""
    p = subprocess.run(altovirt_cmd(*args), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("altovirt: error: ")
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    ([], "-kernel: no kernel given"),
    (["-kernel"], "-kernel: missing value"),
    (["-frobnicate", "1"], "unknown option '-frobnicate'"),
    (["stray"], "unexpected argument 'stray'"),
    (["-kernel", "/nonexistent/vmlinux"], "-kernel: /nonexistent/vmlinux: no such file"),
    (["-kernel", "/tmp"], "not a regular file"),
    (["-kernel", KERNEL, "-initrd", "/nonexistent"], "-initrd: /nonexistent: no such file"),
    (["-kernel", KERNEL, "-smp", "0"], "-smp: 0 is out of range; accepted range [1, 254]"),
    (["-kernel", KERNEL, "-smp", "255"], "-smp: 255 is out of range"),
    (["-kernel", KERNEL, "-smp", "two"], "-smp: invalid integer 'two'"),
    (["-kernel", KERNEL, "-smp", "cpus=2,sockets=1"], "-smp: unknown key 'sockets'"),
    (["-kernel", KERNEL, "-m", "64M"], "-m: 64 MiB is out of range; accepted range [128M, 512G]"),
    (["-kernel", KERNEL, "-m", "1T"], "-m: 1048576 MiB is out of range"),
    (["-kernel", KERNEL, "-m", "12X"], "-m: invalid size '12X'"),
    (["-kernel", KERNEL, "-m", "134217729"], "not a multiple of 4 KiB"),
    (["-kernel", KERNEL, "-pidfile", "/tmp/x.pid"], "-pidfile: only valid together with -daemonize"),
    (["-kernel", KERNEL, "-api-channel", "tcp:1234"], "-api-channel: invalid channel 'tcp:1234'"),
    (["-kernel", KERNEL, "-api-channel", "unix:/nonexistent/dir/sock"], "does not exist"),
    (["-kernel", KERNEL, "-qmp", "unix:/tmp/x.sock,server,wait"], "-qmp: unsupported option 'wait'"),
    (["-kernel", KERNEL, "-qmp", f"unix:{KERNEL},server,nowait"], "already exists; it must not exist"),
    (["-kernel", KERNEL, "-api-channel", f"unix:{KERNEL}"], "-api-channel: " + KERNEL + " already exists"),
    (["-kernel", KERNEL, "-serial", "pty"], "-serial: unsupported backend 'pty'; accepted: stdio, none"),
    (["-kernel", KERNEL, "-drive", "id=d0"], "-drive: missing key 'file'"),
    (["-kernel", KERNEL, "-drive", "id=d0,file=/nonexistent"], "-drive id=d0: /nonexistent: no such file"),
    (["-kernel", KERNEL, "-drive", f"id=d0,file={KERNEL},readonly=maybe"],
     "-drive id=d0 readonly: invalid boolean 'maybe'"),
    (["-kernel", KERNEL, "-drive", f"id=d0,file={KERNEL},cache=none"], "-drive: unknown key 'cache'"),
    (["-kernel", KERNEL, "-drive", f"id=a b,file={KERNEL}"], "-drive id: invalid id 'a b'"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=tap0,mac=zz:00:00:00:00:00"], "-netdev mac: invalid MAC"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=tap0,mac=01:00:00:00:00:01"], "multicast"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=tap0,vhost=maybe"],
     "-netdev vhost: invalid boolean 'maybe'"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=tap0", "-netdev", "id=n1,netdev=tap1",
      "-netdev", "id=n2,netdev=tap2"], "-netdev: 3 NICs given; at most 2"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=tap0", "-netdev", "id=n1,netdev=tap0"],
     "same tap device"),
    (["-kernel", KERNEL, "-netdev", "id=n0,netdev=a/b"], "-netdev netdev: invalid tap name"),
    (["-kernel", KERNEL, "-device", "vsock,id=v0,guest-cid=2"], "-device vsock guest-cid: 2 is out of range"),
    (["-kernel", KERNEL, "-device", "virtio-gpu,id=g"], "-device: unknown device 'virtio-gpu'"),
    (["-kernel", KERNEL, "-device", "virtio-rng,rate=5"], "-device virtio-rng: unknown key 'rate'"),
    (["-kernel", KERNEL, "-device", "virtio-rng,max-bytes=0"],
     "-device virtio-rng max-bytes: 0 is out of range"),
    (["-kernel", KERNEL, "-device", "virtio-rng,period=0"], "-device virtio-rng period: 0 is out of range"),
    (["-kernel", KERNEL, "-device", "virtio-rng,id=a", "-device", "virtio-rng,id=b"],
     "only one entropy device"),
    (["-kernel", KERNEL, "-device", "vsock,id=v0"], "-device vsock: missing key 'guest-cid'"),
    (["-kernel", KERNEL, "-chardev", f"id=c0,path={KERNEL}"], "already exists; it must not exist"),
    (["-kernel", KERNEL, "-netdev", "id=x,netdev=tap0", "-chardev", "id=x,path=/tmp/nope.sock"],
     "id 'x' is already used by -netdev"),
    (["-kernel", KERNEL, "-netdev", "id=x,netdev=tap0", "-device", "virtio-rng,id=x"],
     "-device virtio-rng: id 'x' is already used by -netdev"),
    (["-kernel", KERNEL, "-daemonize", "-serial", "stdio"], "-serial: stdio cannot be used with -daemonize"),
    (["-kernel", KERNEL, "-D", "/nonexistent/dir/log"], "-D: directory /nonexistent/dir does not exist"),
    (["-kernel", KERNEL, "-debug=1"], "-debug: takes no value"),
    (["-kernel", KERNEL, "-machine", "acpi=maybe"], "-machine acpi: invalid boolean 'maybe'; use on/off"),
    (["-kernel", KERNEL, "-machine", "pc"], "-machine: unknown machine type 'pc'; accepted: microvm, q35"),
    (["-kernel", KERNEL, "-machine", "microvm,pic=off"],
     "-machine: unknown key 'pic'; accepted: accel, acpi, dump-guest-core, mem-share, type"),
    (["-config", "/nonexistent.json"], "-config: /nonexistent.json: no such file"),
    (["-kernel", KERNEL, "-drive", f"id=d0,file={KERNEL},throttling.iops-total=0"],
     "-drive id=d0 throttling.iops-total: 0 is out of range"),
    (["-kernel", KERNEL, "-drive", f"id=d0,file={KERNEL},throttling.iops-total=lots"],
     "-drive id=d0 throttling.iops-total: invalid integer 'lots'"),
])
def test_usage_errors(args: list[str], expected: str) -> None:
    assert expected in usage_error(*args)


def test_seven_drives_are_refused(tmp_path: Path) -> None:
    args = ["-kernel", KERNEL]
    for i in range(7):
        img = tmp_path / f"d{i}.img"
        img.write_bytes(b"\0" * 512)
        args += ["-drive", f"id=d{i},file={img}"]
    assert "-drive: 7 disks given; at most 6 are supported" in usage_error(*args)


def test_existing_pidfile_is_refused(tmp_path: Path) -> None:
    pid = tmp_path / "vm.pid"
    pid.write_text("1\n")
    assert "-pidfile: " + str(pid) + " already exists" in usage_error(
        "-kernel", KERNEL, "-daemonize", "-pidfile", str(pid))


def write_json(tmp_path: Path, doc: object) -> str:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


@pytest.mark.parametrize("doc, expected", [
    ("{not json", "not valid JSON"),
    ([], "-config: expected a JSON object"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "gpu": {}}, "-config: unknown key 'gpu'"),
    ({"boot-source": {}}, "boot-source: missing key 'kernel_image_path'"),
    ({"boot-source": {"kernel_image_path": 5}}, "boot-source.kernel_image_path: expected a non-empty string"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"vcpu_count": "2"}},
     'machine-config.vcpu_count: expected an integer in [1, 254], got "2"'),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"vcpu_count": True}},
     "machine-config.vcpu_count: expected an integer"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"mem_size": 1024}},
     "-m: 0 MiB is out of range"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"mem_size": [1]}},
     "machine-config.mem_size: expected bytes"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"omit_vm_memory": "yes"}},
     "machine-config.omit_vm_memory: expected true or false"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "machine-config": {"acpi": "off"}},
     "machine-config.acpi: expected true or false"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "drive": {}}, "drive: expected a JSON array"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "drive": [{"drive_id": "r"}]},
     "drive[0]: missing key 'path_on_host'"),
    ({"boot-source": {"kernel_image_path": KERNEL},
      "net": [{"iface_id": "n", "host_dev_name": "tap0", "mac": "0e:90:df:9f:a8"}]},
     "net[0].mac: invalid MAC"),
    ({"boot-source": {"kernel_image_path": KERNEL},
      "net": [{"iface_id": "n", "host_dev_name": "tap0", "vhost": "on"}]},
     "net[0].vhost: expected true or false"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "vsock": {"vsock_id": "v", "guest_cid": 1}},
     "vsock.guest_cid: 1 is out of range"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "rng": {"rng_id": "r", "max_bytes": "1k"}},
     "rng.max_bytes: expected an integer"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "net": [{"iface_id": "x", "host_dev_name": "tap0"}],
      "rng": {"rng_id": "x"}}, "id 'x' is already used by -netdev"),
    ({"boot-source": {"kernel_image_path": KERNEL}, "serial": {"stdio": 1}},
     "serial.stdio: expected true or false"),
])
def test_json_errors(tmp_path: Path, doc: object, expected: str) -> None:
    assert expected in usage_error("-config", write_json(tmp_path, doc))


def test_spec_json_example_parses(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    doc = {
        "boot-source": {"kernel_image_path": KERNEL,
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda quiet",
                        "initrd_fs_path": KERNEL},
        "machine-config": {"name": "abc", "vcpu_count": 2, "mem_size": 268435456, "omit_vm_memory": False},
        "drive": [{"drive_id": "rootfs", "path_on_host": str(rootfs), "direct": True,
                   "read_only": False, "serial_num": "abcd"}],
        "net": [{"iface_id": "net0", "host_dev_name": "tap0", "mac": "0e:90:df:9f:a8:88"},
                {"iface_id": "net1", "host_dev_name": "tap1", "vhost": True}],
        "console": {"console_id": "charconsole0", "socket_path": str(tmp_path / "console.sock")},
        "serial": {"stdio": True},
        "vsock": {"vsock_id": "vsock-123321132", "guest_cid": 4},
    }
    cfg = load_config(["-config", write_json(tmp_path, doc)])
    assert (cfg.name, cfg.vcpus, cfg.mem_size) == ("abc", 2, 256 * MiB)
    assert cfg.cmdline.startswith("console=ttyS0") and cfg.initrd == KERNEL
    assert cfg.drives[0].id == "rootfs" and cfg.drives[0].serial == "abcd" and cfg.drives[0].direct
    assert (cfg.nets[0].tap, cfg.nets[0].mac, cfg.nets[0].vhost) == ("tap0", "0e:90:df:9f:a8:88", False)
    assert (cfg.nets[1].tap, cfg.nets[1].vhost) == ("tap1", True)
    assert cfg.console is not None and cfg.console.id == "charconsole0"
    assert cfg.vsock is not None and cfg.vsock.guest_cid == 4
    assert cfg.serial_stdio


def test_command_line_overrides_json(tmp_path: Path) -> None:
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    img_a.write_bytes(b"a")
    img_b.write_bytes(b"b")
    doc = {"boot-source": {"kernel_image_path": KERNEL, "boot_args": "from=json"},
           "machine-config": {"vcpu_count": 1, "mem_size": 268435456},
           "drive": [{"drive_id": "d0", "path_on_host": str(img_a)}]}
    path = write_json(tmp_path, doc)
    # -config may come last: it is read first, everything else overrides it.
    cfg = load_config(["-smp", "cpus=3", "-m", "1G", "-append", "from=cli",
                       "-drive", f"id=d0,file={img_b},readonly=on", "-config", path])
    assert (cfg.vcpus, cfg.mem_size, cfg.cmdline) == (3, 1 << 30, "from=cli")
    assert len(cfg.drives) == 1 and cfg.drives[0].path == str(img_b) and cfg.drives[0].read_only


def test_every_spec_option_is_parsed(tmp_path: Path) -> None:
    img = tmp_path / "rootfs"
    img.write_bytes(b"\0" * 512)
    cfg = parse(["-name", "abc", "-kernel", KERNEL, "-append", "console=ttyS0 root=/dev/vda",
                 "-initrd", KERNEL, "-smp", "2", "-m", "512M",
                 "-drive", f"id=rootfs,file={img},readonly=false,direct=true,serial=serial_num",
                 "-netdev", "id=iface_id,netdev=tap0,mac=0e:90:df:9f:a8:88",
                 "-chardev", f"id=console_id,path={tmp_path / 'c.sock'}",
                 "-device", "vsock,id=vsock_id,guest-cid=3",
                 "-api-channel", f"unix:{tmp_path / 'qmp.sock'}", "-serial", "stdio",
                 "-D", str(tmp_path / "log"), "-pidfile", str(tmp_path / "pid"), "-disable-seccomp",
                 "-omit_vm_memory", "-daemonize", "-machine", "microvm,acpi=off"])
    assert cfg.name == "abc" and cfg.vcpus == 2 and cfg.mem_size == 512 * MiB
    assert cfg.drives[0].serial == "serial_num" and not cfg.drives[0].read_only
    assert cfg.nets[0].id == "iface_id" and cfg.vsock is not None and cfg.vsock.guest_cid == 3
    assert cfg.api_channel == f"unix:{tmp_path / 'qmp.sock'}"
    assert not cfg.seccomp and cfg.omit_vm_memory and cfg.daemonize and cfg.serial_stdio and not cfg.acpi
    assert cfg.pidfile == str(tmp_path / "pid") and cfg.log_file == str(tmp_path / "log")


@pytest.mark.parametrize("text, size", [("134217728", 128 * MiB), ("512M", 512 * MiB), ("2G", 2 << 30),
                                        ("2g", 2 << 30), ("262144K", 256 * MiB), ("1GiB", 1 << 30)])
def test_memory_sizes(text: str, size: int) -> None:
    assert parse(["-kernel", KERNEL, "-m", text]).mem_size == size


def test_long_options_and_inline_values() -> None:
    cfg = parse(["--kernel", KERNEL, "--smp=4", "-m=256M", "--serial", "stdio"])
    assert (cfg.vcpus, cfg.mem_size, cfg.serial_stdio) == (4, 256 * MiB, True)


def test_comma_escape_in_values(tmp_path: Path) -> None:
    img = tmp_path / "a,b.img"
    img.write_bytes(b"x")
    cfg = parse(["-kernel", KERNEL, "-drive", f"id=d0,file={tmp_path}/a,,b.img"])
    assert cfg.drives[0].path == str(img)


def test_stratovirts_iops_throttling() -> None:
    """-drive ...,throttling.iops-total=N (StratoVirt 2.x): N requests a second, as a bucket of N
    operations refilled each second."""
    cfg = parse(["-kernel", KERNEL, "-drive", f"id=d0,file={KERNEL},throttling.iops-total=200"])
    assert cfg.drives[0].rate_limiter == RateLimiterConfig(ops=TokenBucketConfig(200, 1000))


def test_help_and_version_exit_zero() -> None:
    for flag, text in (("-help", "usage: altovirt"), ("-version", "altovirt 0.1.0")):
        p = subprocess.run(altovirt_cmd(flag), capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert p.returncode == 0 and text in p.stdout


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ConfigError, match="-smp"):
        parse(["-smp", "x"])


@pytest.mark.parametrize("given, problem", [
    ({"c": None, "a": 1, "b": "x"}, None),
    ({"a": 1, "c": [1]}, None),                         # object takes any value
    # The given keys in their own order, an unknown key or a mistyped value, whichever comes first...
    ({"z": 1, "y": 1}, KeyProblem(Problem.UNKNOWN, "z", accepted=("c", "a", "b"))),
    ({"a": "1", "z": 1}, KeyProblem(Problem.WRONG_TYPE, "a", expected=(int,))),
    ({"b": 2, "a": "1"}, KeyProblem(Problem.WRONG_TYPE, "b", expected=(str, list))),
    ({"c": 0, "a": True}, KeyProblem(Problem.WRONG_TYPE, "a", expected=(int,))),   # JSON's true is no number
    # ...then the first absent required key, in the declared order (c before a), not sorted.
    ({"b": "x"}, KeyProblem(Problem.MISSING, "c")),
    ({"c": None, "b": "x"}, KeyProblem(Problem.MISSING, "a")),
])
def test_key_problem_order(given: dict[str, object], problem: KeyProblem | None) -> None:
    assert find_key_problem(given, {"c": object, "a": int}, {"b": (str, list)}) == problem


def test_altovirt_surfaces_share_one_wording(tmp_path: Path) -> None:
    """The command line and -config word a bad key alike, and name the first one written."""
    def error(argv: list[str]) -> str:
        with pytest.raises(ConfigError) as e:
            parse(argv)
        return str(e.value)

    assert error(["-kernel", KERNEL, "-drive", "id=d0,zz=1,aa=2"]) == \
        ("-drive: unknown key 'zz'; accepted: aio, direct, file, format, id, if, readonly, serial, "
         "throttling.iops-total")
    assert error(["-kernel", KERNEL, "-drive", "id=d0"]) == "-drive: missing key 'file'"
    assert error(["-kernel", KERNEL, "-incoming", "resume=on"]) == "-incoming: missing key 'uri'"
    doc = {"boot-source": {"kernel_image_path": KERNEL}, "drive": [{"drive_id": "d0", "zz": 1, "aa": 2}]}
    assert error(["-config", write_json(tmp_path, doc)]) == \
        ("drive[0]: unknown key 'zz'; accepted: direct, drive_id, io_engine, path_on_host, rate_limiter, "
         "read_only, serial_num")
    doc = {"boot-source": {"kernel_image_path": KERNEL}, "drive": [{"drive_id": "d0"}]}
    assert error(["-config", write_json(tmp_path, doc)]) == "drive[0]: missing key 'path_on_host'"
    # Required keys are sets without an order: the first missing one in sorted order.
    with pytest.raises(ConfigError, match=r"^x: missing key 'a'$"):
        check_keys("x", {}, {"b", "a"}, set())
