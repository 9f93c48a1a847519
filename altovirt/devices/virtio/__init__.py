"""virtio devices on the virtio-mmio transport (VIRTIO 1.2)."""
