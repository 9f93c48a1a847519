"""Architecture-specific code; only x86_64 for now."""
