"""Row ids: random, 32 hex characters, minted by the server."""

from __future__ import annotations

import uuid


def new_id() -> str:
    return uuid.uuid4().hex
