"""Bearer-token auth, the one check every transport makes before it reads a request."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from adpa.errors import Unauthenticated

Pairs = Iterable[tuple[str | bytes, str | bytes]]


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class BearerAuth:
    """Accepts a call when some `authorization` entry of its metadata (gRPC) or headers (HTTP) is
    `Bearer <token>`; with no token, accepts every call."""

    def __init__(self, token: str | None):
        self._expected = f"Bearer {token}".encode() if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def check(self, pairs: Pairs | None) -> None:
        """Raise Unauthenticated unless the token is offered (every entry searched)."""
        if self._expected is None:
            return
        offered = [_bytes(value) for key, value in (pairs or ()) if _bytes(key).lower() == b"authorization"]
        # Compare against every entry, without stopping early, in constant time per entry.
        matches = [hmac.compare_digest(value, self._expected) for value in offered]
        if not any(matches):
            raise Unauthenticated("missing bearer token" if not offered else "invalid bearer token")
