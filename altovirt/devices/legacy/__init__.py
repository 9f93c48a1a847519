"""PC legacy devices on the port-I/O bus."""
