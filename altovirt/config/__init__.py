"""Configuration: command line and JSON in, one validated VmConfig out."""

from .cmdline import USAGE, HelpRequested
from .model import ConfigError, VmConfig
from .validate import check_vm


def load_config(argv: list[str]) -> VmConfig:
    """Parse and validate; ConfigError (usage) or HelpRequested on the way."""
    from .cmdline import parse
    return check_vm(parse(argv))


__all__ = ["USAGE", "ConfigError", "HelpRequested", "VmConfig", "load_config"]
