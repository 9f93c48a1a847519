"""Confinement of the VMM process: seccomp filters (and, later, the jailer)."""
