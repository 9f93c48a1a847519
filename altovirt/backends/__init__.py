"""Host-side backends behind devices: image files, taps, sockets."""

from ..errors import AltoVirtError


class BackendError(AltoVirtError, OSError):
    """A backend cannot be used (missing, busy, refused); the message says why."""
