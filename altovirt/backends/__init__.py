"""Host-side backends behind devices: image files, taps, sockets."""


class BackendError(OSError):
    """A backend cannot be used (missing, busy, refused); the message says why."""
