"""The `Idempotency-Key` header on POST /v1/jobs and the upload routes.

Same key and same body: the resource the first request created, answered 200 (the first
answer was 201). Same key, another body (or route): 409. Keys are per tenant and kept
`idempotency_ttl_seconds` (24 h). The body is hashed canonically: a job request as its
validated JSON (sorted keys, defaults filled in), an upload as its file bytes and form fields.

For jobs the key row is written by db.jobs.create_job_once with the job. An upload route uses
`upload_replay` before it stores anything and `UploadKey` around its commit:

    idem, again = await upload_replay(request, session, settings, tenant=..., kind="dataset",
                                      route="POST /v1/datasets", parts=(data, name))
    if again is not None:
        response.status_code = 200
        return out(again)
    with UploadKey(session, idem):
        row = save(...)   # the key row is flushed with the Upload row, in its commit
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from fastapi import HTTPException, Request
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from convoy.settings import Settings
from db import idempotency, uploads
from db.idempotency import Idem, KeyReused
from db.tables import Upload

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


def key_from(request: Request) -> str | None:
    """The header's value, None when absent, or 400 for an empty, too long or non-printable
    key (printable ASCII only: a key is compared byte for byte)."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not raw or len(raw) > MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in raw):
        raise HTTPException(400, f"{HEADER} header: must be 1 to {MAX_KEY_LENGTH} printable "
                                 "ASCII characters")
    return raw


def hash_parts(route: str, parts: Iterable[bytes | str | None]) -> str:
    digest = hashlib.sha256(route.encode())
    for part in parts:
        blob = b"\xff" if part is None else (part.encode("utf-8", "surrogatepass")
                                             if isinstance(part, str) else bytes(part))
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)


def idem_for(request: Request, *, tenant: str, route: str,
             parts: Iterable[bytes | str | None]) -> Idem | None:
    key = key_from(request)
    if key is None:
        return None
    return Idem(tenant=tenant, key=key, route=route, request_hash=hash_parts(route, parts))


def conflict(exc: KeyReused) -> HTTPException:
    return HTTPException(409, str(exc))


async def upload_replay(request: Request, session: Session, settings: Settings, *,
                        tenant: str, kind: str, route: str,
                        parts: Iterable[bytes | str | None]) -> tuple[Idem | None, Upload | None]:
    """(the request's key or None, the upload an earlier request with it created or None);
    409 when the key was used with another body."""
    idem = idem_for(request, tenant=tenant, route=route, parts=parts)
    if idem is None:
        return None, None

    def look() -> Upload | None:
        try:
            found = idempotency.find(session, idem, ttl_seconds=settings.idempotency_ttl_seconds)
        except KeyReused as exc:
            raise conflict(exc) from None
        row = uploads.get(session, id=found, tenant=tenant, kind=kind) if found else None
        if found and row is None:
            idempotency.forget(session, idem)
        session.commit()
        return row

    return idem, await run_in_threadpool(look)


class UploadKey:
    """Around the upload's save: the key row goes into the flush that inserts the Upload row
    (same transaction). A concurrent request that committed the same key first makes this one
    a 409 that asks to retry (the retry gets the winner's upload); the route's own clean-up
    (no file without its row) runs as for any failed commit."""

    def __init__(self, session: Session, idem: Idem | None) -> None:
        self.session, self.idem = session, idem
        self.done = False

    def _before_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        if self.done or self.idem is None:
            return
        for obj in list(session.new):
            if isinstance(obj, Upload):
                idempotency.remember(session, self.idem, obj.id)
                self.done = True
                return

    def __enter__(self) -> UploadKey:
        if self.idem is not None:
            event.listen(self.session, "before_flush", self._before_flush)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        if self.idem is None:
            return
        event.remove(self.session, "before_flush", self._before_flush)
        if isinstance(exc, IntegrityError) and "idempotency" in str(exc).lower():
            self.session.rollback()
            raise HTTPException(409, f"{HEADER} {self.idem.key[:80]!r}: a concurrent request "
                                     "with this key is creating the same upload; retry to get "
                                     "it") from None
