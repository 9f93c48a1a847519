"""What every benchmark needs: the probe built, AltoVirt's bytecode current, both VMMs found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "guest" / "probe.elf"


def prepare() -> None:
    """Build the probe and measure AltoVirt as installed: with current bytecode (compileall
    writes it even under PYTHONDONTWRITEBYTECODE)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "altovirt")], check=True)


def _venv_runs() -> bool:
    """Whether the README's .venv runs here: its interpreter is there (not in the arm64 test
    bed, whose root is not the host's that the .venv was made on)."""
    return (ROOT / ".venv" / "bin" / "python").resolve().exists()


def altovirt() -> list[str]:
    """The console script from the README's setup, else the package run by this interpreter."""
    exe = ROOT / ".venv" / "bin" / "altovirt"
    return [str(exe)] if _venv_runs() else [sys.executable, "-m", "altovirt"]


def altovirt_python() -> list[str]:
    """The interpreter the console script runs (the README's setup), else this one."""
    exe = ROOT / ".venv" / "bin" / "python"
    return [str(exe)] if _venv_runs() else [sys.executable]


def qemu() -> str:
    """QEMU for this machine: qemu-system-x86_64 or qemu-system-aarch64."""
    name = f"qemu-system-{os.uname().machine}"
    exe = shutil.which(name)
    if exe is None:
        raise SystemExit(f"bench: {name} not found (./scripts/setup installs it)")
    return exe
