"""The VMM: builds a VM from its configuration and runs it."""
