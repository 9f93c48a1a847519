"""Device models: the I/O buses and the devices on them."""
