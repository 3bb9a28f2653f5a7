"""The OpenAPI document as the API behaves, and `OPTIONS` answers.

FastAPI documents a route's success and its 422 only. The rest is declared here, from what
every route shares (the bearer token, the body limits, the database's 503) and a table of
what single routes add; one error body (`ErrorOut`) for every error status.
tests/api/test_openapi_client.py drives a client generated from this document, which fails
on any status the document leaves out."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Receive, Scope, Send

from api.schemas import ErrorOut

BEARER = "bearer"
REF = "#/components/schemas/{model}"

MESSAGES = {
    400: "a body that cannot be parsed (bytes that are not UTF-8, a malformed multipart "
         "body) or a malformed Idempotency-Key header",
    401: "missing, invalid or revoked token",
    403: "this needs an admin token (or, for /metrics, the `metrics` scope)",
    404: "not found (or not this tenant's)",
    409: "a conflict with the resource's state, or an Idempotency-Key reused with another body",
    413: "the body (or the answer asked for) is larger than the limit",
    415: "a body of the wrong content type",
    416: "the `Range` asked for starts past the end of the file: `Content-Range: bytes */size`",
    422: "invalid input: `detail` lists each field and the reason",
    429: "over a quota or limit: retry after `Retry-After` seconds",
    503: "the database is busy or unavailable: retry after `Retry-After` seconds",
    507: "the artifact store cannot be written or read (full, read-only): retry later",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer"}}}
HEADERS: dict[int, dict[str, Any]] = {
    416: {"Content-Range": {"description": "`bytes */size`", "schema": {"type": "string"}}},
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
    507: RETRY_AFTER,
}
UPLOADS = ("/v1/datasets", "/v1/checkpoints", "/v1/inputs")

# What single operations can answer beyond the shared rules in `error_statuses`.
ROUTE_ERRORS: dict[tuple[str, str], set[int]] = {
    # unknown checkpoint/job/upload, a key reused, the queue quota, the store read for a
    # feature-map job's inputs
    ("POST", "/v1/jobs"): {404, 409, 429, 507},
    # queued or running (or a running job starts from it); the store's deletes
    ("DELETE", "/v1/jobs/{job_id}"): {409, 507},
    ("DELETE", "/v1/uploads/{upload_id}"): {409, 507},
    ("POST", "/v1/jobs/{job_id}/cancel"): {409},
    # the base's dataset upload not found; a key reused
    ("POST", "/v1/sweeps"): {404, 409},
    ("POST", "/v1/sweeps/{sweep_id}/cancel"): {409},  # the sweep has already ended
    ("DELETE", "/v1/tokens/{token_id}"): {409},  # the last admin token
    ("GET", "/v1/jobs/{job_id}/events"): {429},  # open streams per tenant and in total
    # too many values for JSON; a Range past the end; the store read
    ("GET", "/v1/jobs/{job_id}/feature-maps/{layer}"): {413, 416, 507},
    ("GET", "/v1/jobs/{job_id}/checkpoints/{name}"): {416, 507},
    ("GET", "/v1/jobs/{job_id}/predictions"): {507},  # the store read
    ("GET", "/v1/jobs/{job_id}/export"): {416, 507},
    # a key reused, the store written
    **{("POST", path): {409, 507} for path in UPLOADS},
    # a token without the `metrics` scope (401 and 503: needs_token)
    ("GET", "/metrics"): {403},
    ("GET", "/v1/workers"): {403},  # admin
    ("GET", "/v1/fleet"): {403},  # admin
    ("POST", "/v1/webhooks"): {429},  # max_webhooks_per_tenant
}


def error_statuses(path: str, method: str) -> set[int]:
    """Every error status `method` on `path` (a template, `/v1/jobs/{job_id}`) can answer."""
    found = {422}  # RejectNul: a NUL byte in any query string
    if needs_token(path):
        found |= {401, 503}  # the token is checked in the database
    if path.startswith("/v1/tokens"):
        found.add(403)
    if "{" in path:
        found.add(404)
    if method in ("POST", "PUT", "PATCH"):
        # BodyLimit; and 400 for a body that is not text (FastAPI: "error parsing the body")
        found |= {400, 413, 415}
    return found | ROUTE_ERRORS.get((method, path), set())


def needs_token(path: str) -> bool:
    """Every /v1 operation and /metrics (unless CONVOY_METRICS_PUBLIC); the probes, the
    document and the dashboard need none."""
    return path.startswith("/v1/") or path == "/metrics"


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": MESSAGES.get(status, "error"),
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorOut")}}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorOut.model_json_schema(ref_template=REF)
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorOut"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    doc["components"]["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer",
                 "description": "`Authorization: Bearer <token>`; `convoy token create` "
                                "makes one"}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            for status in sorted(error_statuses(path, method.upper())):
                existing = responses.get(str(status), {})
                declared = _error_response(status)
                # a route's own body for that status (readyz's 503) is kept
                content = str(existing.get("content", ""))
                if content and "ErrorOut" not in content and "ValidationError" not in content:
                    declared["content"] = existing["content"]
                headers = {**declared.get("headers", {}), **existing.get("headers", {})}
                if headers:
                    declared["headers"] = headers
                responses[str(status)] = declared
            if method == "post" and path in UPLOADS:
                responses.setdefault("200", {
                    "description": "the upload an earlier request with the same "
                                   "Idempotency-Key and body created",
                    "content": responses["201"]["content"]})
            if needs_token(path):
                op["security"] = [{BEARER: []}]
            op["responses"] = dict(sorted(responses.items()))
    return doc


def install(app: FastAPI) -> None:
    """Serve `build(app)` as /openapi.json (made once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


# Served outside the document: the dashboard's page.
UNDOCUMENTED = {"/": {"GET"}}


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")


class AllowOptions:
    """`OPTIONS <path>` answers 204 with `Allow` listing every method the path takes (from
    the OpenAPI document, which lists every route); a path no route takes goes on to the
    usual 404."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app, self.api = app, api
        self.paths: list[tuple[re.Pattern[str], set[str]]] | None = None

    def table(self) -> list[tuple[re.Pattern[str], set[str]]]:
        if self.paths is None:
            routes = {path: {m.upper() for m in ops}
                      for path, ops in self.api.openapi()["paths"].items()}
            self.paths = [(_pattern(path), methods)
                          for path, methods in {**routes, **UNDOCUMENTED}.items()]
        return self.paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            return await self.app(scope, receive, send)
        methods: set[str] = set()
        for pattern, allowed in self.table():
            if pattern.match(scope["path"]):
                methods |= allowed
        if not methods:
            return await self.app(scope, receive, send)
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"allow", allow.encode())]})
        await send({"type": "http.response.body", "body": b""})
