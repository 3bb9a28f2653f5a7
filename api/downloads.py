"""Artifact downloads, streamed from the store in chunks (nothing held whole in memory).

- `Range: bytes=a-b`, `bytes=a-`, `bytes=-n` (one range) -> 206 with `Content-Range`;
  a range that starts past the end (or `-0`) -> 416 with `Content-Range: bytes */size`;
  a malformed header or several ranges -> the whole file, 200 (never a 5xx).
- `X-Sha256` is the sha256 recorded when the artifact was written (its row): the bytes are
  streamed, so the API cannot hash them before the headers go out. A client verifies the
  download against it (the workers verify every checkpoint they read the same way).
- With `CONVOY_S3_PRESIGNED_DOWNLOADS=true` and a bucket store: 302 to a presigned URL valid
  `CONVOY_S3_PRESIGNED_SECONDS`, the bytes then come from the bucket directly.
"""

from __future__ import annotations

import re

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from convoy.artifacts import ArtifactStore, MissingArtifact
from convoy.settings import Settings
from db.tables import Artifact

RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of one satisfiable range; None for the whole file (no header,
    a malformed one, several ranges); Unsatisfiable for a range past the end."""
    if not header or "," in header:
        return None
    m = RANGE_RE.match(header)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if len(first) > 20 or len(last) > 20:  # absurd numbers: treat as malformed
        return None
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable()
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # a-b with b < a: syntactically invalid, ignored (RFC 9110 14.1.1)
    if start >= size:
        raise Unsatisfiable()
    return start, end


def artifact_download(request: Request, store: ArtifactStore, settings: Settings,
                      artifact: Artifact, *, filename: str, missing: str,
                      media_type: str = "application/octet-stream",
                      headers: dict[str, str] | None = None) -> Response:
    """The artifact's file as a streamed (or ranged, or redirected) response; 404 with
    `missing` when the store has no file under its key."""
    base = {**(headers or {}), "X-Sha256": artifact.sha256, "Accept-Ranges": "bytes",
            "Content-Disposition": f'attachment; filename="{filename}"'}
    try:
        size = store.size(artifact.key)
    except MissingArtifact:
        raise HTTPException(404, missing) from None
    if settings.s3_presigned_downloads:
        url = store.presigned_url(artifact.key, settings.s3_presigned_seconds)
        if url is not None:
            return RedirectResponse(url, status_code=302, headers={
                "X-Sha256": artifact.sha256, "Cache-Control": "no-store"})
    try:
        span = parse_range(request.headers.get("range"), size)
    except Unsatisfiable:
        return JSONResponse({"detail": f"Range {request.headers.get('range', '')[:80]!r} is not "
                                       f"satisfiable: the file has {size} bytes"},
                            status_code=416, headers={**base, "Content-Range": f"bytes */{size}"})
    if span is None:
        start, end, status = 0, size, 200
    else:
        (start, end), status = span, 206
        base["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    base["Content-Length"] = str(end - start)
    return StreamingResponse(store.aiter_range(artifact.key, start, end), status_code=status,
                             media_type=media_type, headers=base)


# For the OpenAPI document: what a download route answers besides its 200.
DOWNLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    206: {"description": "the single byte range the `Range` header asked for "
                         "(`Content-Range` says which)",
          "content": {"application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}},
    302: {"description": "with CONVOY_S3_PRESIGNED_DOWNLOADS=true: `Location` is a short-lived "
                         "presigned URL of the file in the bucket",
          "headers": {"Location": {"schema": {"type": "string"}}}},
}
