"""AltoVirt: a lightweight KVM virtual machine monitor in Python."""

import time as _time

__version__ = "0.1.0"
# When the package began to import (for a VMM a warm parent forked, when the fork began): the
# start-up budget (vmm/run.py) counts its phases from here.
IMPORT_STARTED = _time.perf_counter()
# The Firecracker release whose REST API and flags altovirt-firecracker follows.
FIRECRACKER_API_VERSION = "1.16.1"
