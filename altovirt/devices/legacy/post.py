"""Port 0x80, the POST diagnostic port: firmware and Linux's io_delay write it; nothing listens."""

from __future__ import annotations

POST_PORT = 0x80


class PostPort:
    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        pass
