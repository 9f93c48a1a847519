"""The Linux guests' fixtures (tests/linux/conftest.py), for Debian's arm64 kernel."""

from ..linux.conftest import initrd, kernel, logs_back_to_the_host

__all__ = ["initrd", "kernel", "logs_back_to_the_host"]
