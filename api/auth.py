"""API tokens: stored as sha256 hashes, each belonging to a tenant; the bootstrap admin."""

from __future__ import annotations

import enum
import hashlib
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session

from convoy.settings import Settings
from db import job_reads, tokens
from db.tables import Job, Token

TOKEN_PREFIX = "cvy_"
# Same rule as api.schemas.TokenIn: tenants are plain identifiers (they name rows and log lines).
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Principal:
    tenant: str
    token_id: str
    is_admin: bool
    scopes: frozenset[str] = frozenset()


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, *, tenant: str, name: str = "", is_admin: bool = False,
                 secret: str | None = None, scopes: tuple[str, ...] = ()) -> tuple[Token, str]:
    secret = secret or TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = tokens.create(session, tenant=tenant, name=name, token_hash=hash_token(secret),
                          is_admin=is_admin, scopes=" ".join(sorted(set(scopes))))
    return token, secret


def plausible(secret: str) -> bool:
    return bool(secret) and len(secret) <= 256


def _principal(token: Token | None) -> Principal | None:
    return None if token is None else Principal(tenant=token.tenant, token_id=token.id,
                                                is_admin=token.is_admin,
                                                scopes=frozenset((token.scopes or "").split()))


def authenticate(session: Session, secret: str) -> Principal | None:
    if not plausible(secret):
        return None
    return _principal(tokens.find_live(session, token_hash=hash_token(secret)))


def lookup_token(database_url: str, digest: str) -> Principal | None:
    """The token check on a short session of its own, opened, queried and closed in one call
    (one thread trip), on a small engine of its own: it never waits behind the request pool,
    and no connection is held while waiting for a thread."""
    from db.session import get_side_sessionmaker

    with get_side_sessionmaker(database_url, "auth")() as session:
        return _principal(tokens.find_live(session, token_hash=digest))


class _Missing(enum.Enum):
    """Not in the cache (a sentinel mypy can narrow on: `found is MISSING`)."""

    MISSING = "missing"


MISSING = _Missing.MISSING
# what the cache knows of a token: its principal, None (a bad token), or MISSING
Cached = Principal | None | _Missing
# a lookup in flight: set when it ends, and its answer (api.deps.check_token)
InFlight = tuple[anyio.Event, list[Principal | None]]


class TokenCache:
    """Recent answers of the token check, by the token's sha256 (never the secret): a bad
    token is remembered for `miss_seconds`, so sending it again costs no database trip; a
    good one for `hit_seconds` (0 by default: a revocation takes effect at once). Bounded: the
    oldest entries go first. Thread-safe (read from the event loop and from handlers)."""

    def __init__(self, *, hit_seconds: float, miss_seconds: float, size: int) -> None:
        self.hit_seconds, self.miss_seconds, self.size = hit_seconds, miss_seconds, size
        self._entries: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._lock = threading.Lock()
        # digest -> (event set when the lookup in flight for it ends, [its answer]); requests
        # asking about the same token meanwhile share that one lookup (api.deps.check_token)
        self.inflight: dict[str, InFlight] = {}

    def get(self, digest: str) -> Cached:
        """The cached Principal, None for a known bad token, or MISSING."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return MISSING
            if entry[0] < time.monotonic():
                del self._entries[digest]
                return MISSING
            return entry[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        ttl = self.miss_seconds if principal is None else self.hit_seconds
        if ttl <= 0:
            return
        with self._lock:
            self._entries[digest] = (time.monotonic() + ttl, principal)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def known_bad(self, secret: str) -> bool:
        return not plausible(secret) or self.get(hash_token(secret)) is None


def job_for_token(session: Session, job_id: str, secret: str) -> Job | None:
    """The job, if `secret` is a live token of the job's tenant: the token check and the read
    in one statement (a status poll's whole database cost). None says nothing about which
    part failed; the caller asks `authenticate` to tell a bad token (401) from a missing job."""
    if not plausible(secret):
        return None
    return job_reads.for_token(session, job_id=job_id, token_hash=hash_token(secret))


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant {tenant[:80]!r}: 1-64 letters, digits, - or _")
    return tenant


def ensure_bootstrap(session: Session, settings: Settings) -> str | None:
    """Make sure an admin can log in. Returns a newly minted secret to show once, else None.
    A production API refuses to start without CONVOY_BOOTSTRAP_TOKEN rather than mint and
    print a secret into a container log; workers never need the token."""
    if settings.env == "production" and not settings.bootstrap_token:
        raise RuntimeError("CONVOY_BOOTSTRAP_TOKEN must be set when CONVOY_ENV=production")
    if settings.bootstrap_token:
        if not tokens.exists(session, token_hash=hash_token(settings.bootstrap_token)):
            create_token(session, tenant="default", name="bootstrap", is_admin=True,
                         secret=settings.bootstrap_token)
        return None
    if tokens.has_live_admin(session):
        return None
    _, secret = create_token(session, tenant="default", name="first admin", is_admin=True)
    path = settings.token_file
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    print(f"Convoy admin token (shown once, also saved to {path}): {secret}", file=sys.stderr,
          flush=True)
    return secret
