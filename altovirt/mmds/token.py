"""MMDS V2 session tokens (Firecracker's ``src/vmm/src/mmds/token.rs``): a token names its
expiry, and only this VMM can make one that checks.

Firecracker seals the expiry with AES-GCM; here it is signed with HMAC-SHA256 under a key
drawn at start, which gives what a guest can see of the token the same properties: opaque,
unforgeable, valid until its time to live runs out, and not valid in another VMM (the key is
not saved in a snapshot, as Firecracker's is not).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time

from ..errors import AltoVirtError

MIN_TTL = 1                 # s (token.rs: MIN_TOKEN_TTL_SECONDS)
MAX_TTL = 21600             # s (MAX_TOKEN_TTL_SECONDS)
TOKEN_LENGTH_LIMIT = 70     # longer strings are refused unread (TOKEN_LENGTH_LIMIT)
_EXPIRY = struct.Struct("<Q")
_TAG_LEN = 24


class TokenError(AltoVirtError):
    """A time to live out of range."""


class TokenAuthority:
    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._aad = b""

    def set_aad(self, instance_id: str) -> None:
        """Tie tokens to the instance's id too (Firecracker's additional authenticated data)."""
        self._aad = instance_id.encode()

    def _tag(self, expiry: bytes) -> bytes:
        return hmac.new(self._key, expiry + self._aad, hashlib.sha256).digest()[:_TAG_LEN]

    def generate(self, ttl_seconds: int) -> str:
        if not MIN_TTL <= ttl_seconds <= MAX_TTL:
            raise TokenError(f"Invalid time to live value provided for token: {ttl_seconds}. Please provide "
                             f"a value between {MIN_TTL} and {MAX_TTL}.")
        expiry = _EXPIRY.pack(int(time.monotonic() * 1000) + ttl_seconds * 1000)
        return base64.b64encode(expiry + self._tag(expiry)).decode()

    def is_valid(self, token: str) -> bool:
        if len(token) > TOKEN_LENGTH_LIMIT:
            return False
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(raw) != _EXPIRY.size + _TAG_LEN:
            return False
        expiry, tag = raw[:_EXPIRY.size], raw[_EXPIRY.size:]
        if not hmac.compare_digest(tag, self._tag(expiry)):
            return False
        return int(time.monotonic() * 1000) < _EXPIRY.unpack(expiry)[0]
