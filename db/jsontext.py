"""JSON read back from the database: a stored lone UTF-16 surrogate (which no UTF-8 encoder
accepts, and which broke every response that held it) comes back as U+FFFD. Stdlib only; the
engine uses `loads_replacing` as its JSON deserializer (db/session.py)."""

from __future__ import annotations

import json
import re
from typing import Any

# A JSON escape of a UTF-16 surrogate (paired ones too: a cheap pre-filter, confirmed by a walk).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
SURROGATE = re.compile("[\ud800-\udfff]")


def _fix(text: str) -> str:
    return SURROGATE.sub("\ufffd", text)


def replace_unencodable(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD (in keys too); iterative."""
    if isinstance(value, str):
        return _fix(value)
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, (dict, list)):
                child: Any = {} if isinstance(item, dict) else []
                stack.append((item, child))
            else:
                child = _fix(item) if isinstance(item, str) else item
            if isinstance(target, dict):
                target[_fix(key) if isinstance(key, str) else key] = child
            else:
                target.append(child)
    return root


def loads_replacing(raw: str | bytes | bytearray | memoryview) -> Any:
    """json.loads for values read back from the database: a stored lone surrogate comes back
    as U+FFFD instead of breaking whoever writes it out. The walk runs only when the text
    holds a surrogate escape at all (a C-speed search), so ordinary rows cost nothing extra."""
    if isinstance(raw, memoryview):
        raw = bytes(raw)
    value = json.loads(raw)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if SURROGATE_ESCAPE.search(data) or (isinstance(raw, str) and SURROGATE.search(raw)):
        value = replace_unencodable(value)
    return value
