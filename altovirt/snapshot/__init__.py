"""Snapshots of a VM: the files (:mod:`.format`); saving and restoring a VM builds on them."""
