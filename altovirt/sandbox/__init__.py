"""Confinement of the VMM process: seccomp filters per thread, and the jailer."""
