"""Host-side backends behind devices: image files, taps, sockets."""
