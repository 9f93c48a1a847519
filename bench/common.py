"""What every benchmark needs: the probe built, AltoVirt's bytecode current, both VMMs found."""

from __future__ import annotations

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


def altovirt() -> list[str]:
    """The console script from the README's setup, else the package run by this interpreter."""
    exe = ROOT / ".venv" / "bin" / "altovirt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "altovirt"]


def altovirt_python() -> list[str]:
    """The interpreter the console script runs (the README's setup), else this one."""
    exe = ROOT / ".venv" / "bin" / "python"
    return [str(exe)] if exe.exists() else [sys.executable]


def qemu() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise SystemExit("bench: qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return exe
