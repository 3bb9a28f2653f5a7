"""Guards against hostile input that no single route should have to remember: NUL bytes in
URLs, values the database refuses, and 422 bodies in the shape the OpenAPI schema promises."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send


class RejectNul:
    """A NUL byte in the path gives 404 and in the query string 422, before any route runs.

    PostgreSQL text cannot hold NUL, so `/v1/jobs/%00` used to reach the driver and come back
    as a 500; a file system would truncate the name at it. No Convoy name ever contains one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope.get("path", "")
            raw_path: bytes = scope.get("raw_path") or b""
            if "\x00" in path or b"\x00" in unquote_to_bytes(raw_path):
                return await JSONResponse({"detail": "not found"}, 404)(scope, receive, send)
            query: bytes = scope.get("query_string", b"")
            if b"\x00" in unquote_to_bytes(query):
                body = {"detail": [{"loc": ["query"], "msg": "NUL bytes are not allowed",
                                    "type": "value_error"}]}
                return await JSONResponse(body, 422)(scope, receive, send)
        await self.app(scope, receive, send)


def as_validation_detail(detail: Any) -> list[dict[str, Any]]:
    """A 422 detail as FastAPI's HTTPValidationError list (what /openapi.json documents)."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        return [{"loc": list(d.get("loc", [])), "msg": str(d["msg"]),
                 "type": str(d.get("type", "value_error"))} for d in detail]
    message = str(detail)
    # "field: reason" names the field; keep that in loc as well as in the message.
    field, sep, _ = message.partition(":")
    loc = field.strip().split(".") if sep and field.strip().replace(
        ".", "").replace("_", "").isalnum() else []
    return [{"loc": loc, "msg": message, "type": "value_error"}]


async def http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 422:
        return JSONResponse({"detail": as_validation_detail(exc.detail)}, 422,
                            headers=getattr(exc, "headers", None))
    return await http_exception_handler(request, exc)


async def data_error(_: Request, exc: DataError) -> JSONResponse:
    """The database refused a value (NUL in text, a number out of range): the client's fault,
    a 422, never a 500. The driver's message is not echoed (it quotes SQL)."""
    return JSONResponse({"detail": [{"loc": [], "msg": "a value was refused by the database "
                                     "(NUL byte, too long or out of range)",
                                     "type": "value_error"}]}, 422)


# The database is away (an outage, a failover) or every pooled
# connection is busy past the pool timeout. Both pass: the client should retry, not see a 500.
DATABASE_RETRY_AFTER_SECONDS = 5


async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    """503 JSON with Retry-After for sqlalchemy's pool TimeoutError, OperationalError and
    InterfaceError (connection refused, dropped, closed). The driver's text is not echoed."""
    if isinstance(exc, PoolTimeout):
        detail = "the database is busy (no connection free): retry shortly"
    else:
        detail = "the database is unavailable: retry shortly"
    return JSONResponse({"detail": detail}, 503,
                        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})


async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    """Any other driver error: a lost connection is a 503 as above; otherwise a JSON 500."""
    if exc.connection_invalidated:
        return await database_unavailable(request, exc)
    logging.getLogger(__name__).error("database error on %s %s", request.method,
                                      request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal database error"}, 500)
