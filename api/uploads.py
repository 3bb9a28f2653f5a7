"""Reading an upload: bounded in size, streamed to the store under a server-built key."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, UploadFile
from sqlalchemy.orm import Session

from api.quota import check_storage
from api.textguard import unencodable_detail
from convoy.artifacts import ArtifactStore, upload_key
from convoy.settings import Settings
from convoy.textsafe import unencodable
from db import uploads
from db.ids import new_id
from db.tables import Upload

CHUNK = 1 << 20


async def read_capped(file: UploadFile, settings: Settings, *, field: str = "file") -> bytes:
    """The whole upload, or 413 once it passes max_upload_bytes."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await file.read(CHUNK):
        total += len(chunk)
        if total > settings.max_upload_bytes:
            raise HTTPException(413, f"{field}: larger than max_upload_bytes="
                                     f"{settings.max_upload_bytes}")
        chunks.append(chunk)
    if total == 0:
        raise HTTPException(422, [{"loc": ["body", field], "msg": "the file is empty",
                                   "type": "value_error"}])
    return b"".join(chunks)


def display_name(filename: str | None) -> str:
    """A user's file name kept only for display: no paths, no control characters."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:128]


def check_form_text(*fields: tuple[str, str | None]) -> None:
    """422 naming the field for form text that UTF-8 cannot encode: a multipart body may
    declare a charset (utf-7, say) whose decoding yields lone surrogates."""
    for field, value in fields:
        if value is not None and unencodable(value):
            raise HTTPException(422, [unencodable_detail(["body", field], field)])


def save_upload(session: Session, store: ArtifactStore, *, tenant: str, kind: str, name: str,
          data: bytes, suffix: str, meta: dict[str, Any], settings: Settings | None = None
          ) -> Upload:
    """Store the file under a server-built key and insert its row; no file without its row.
    With `settings`, 413 when the file would take the tenant past its storage quota."""
    if settings is not None:
        check_storage(session, settings, tenant=tenant, adding=len(data), what="file")
    upload_id = new_id()
    key = upload_key(f"{kind}s", upload_id, suffix)
    size, sha = store.put_bytes(key, data)
    try:
        return uploads.add(session, id=upload_id, tenant=tenant, kind=kind, name=name, key=key,
                           size=size, sha256=sha, meta=meta)
    except Exception:
        store.delete(key)  # no file without its row
        raise
