"""Refuses JSON bodies holding text that UTF-8 cannot encode (a lone surrogate such as
`"\\ud800"`), before any route parses, stores or echoes it.

Such a string validated as a plain `str`, was committed to the jobs table, and then broke
every response that contained it. Only bodies that contain a surrogate
escape at all are parsed and walked here; an emoji written as a pair (`"\\ud83d\\ude00"`) is
valid and passes.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convoy.textsafe import first_unencodable
from db.jsontext import SURROGATE_ESCAPE


def unencodable_detail(loc: list[str | int], where: str) -> dict[str, object]:
    return {"loc": loc, "msg": f"{where}: text that cannot be encoded as UTF-8 (a lone UTF-16 "
                               "surrogate escape such as \\ud800)", "type": "value_error"}


class RejectUnencodableJSON:
    """422 naming the field for a JSON body with a string (or key) UTF-8 cannot encode."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return await self.app(scope, receive, send)
        # The body is read here, once (BodyLimit, outside, caps it); the route gets it replayed.
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return await self.app(scope, _replay([], message, receive), send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # json.loads also reads UTF-16 and UTF-32 bodies, whose escapes the byte search
        # cannot see: those are always walked
        if SURROGATE_ESCAPE.search(body) or json.detect_encoding(body) != "utf-8":
            try:
                path = first_unencodable(json.loads(body))
            except (ValueError, RecursionError):
                path = None  # not JSON: the route answers that as usual
            if path is not None:
                loc: list[str | int] = ["body", *path]
                where = ".".join(str(p) for p in path) or "body"
                return await JSONResponse({"detail": [unencodable_detail(loc, where)]},
                                          422)(scope, receive, send)
        await self.app(scope, _replay([body], None, receive), send)


def _replay(bodies: list[bytes], last: Message | None, receive: Receive) -> Receive:
    pending: list[Message] = [{"type": "http.request", "body": b, "more_body": False}
                              for b in bodies] + ([last] if last is not None else [])

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
