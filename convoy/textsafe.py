"""Text that cannot be written as UTF-8, and JSON that is too deep or too big to parse.

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`); Python decodes it to a `str` that no
UTF-8 encoder accepts. Stored, such a value broke every response that contained it, so
requests holding one are refused (`first_unencodable`) and values read back from storage are
repaired with U+FFFD (db/jsontext.py). The repairs live in db/jsontext.py
(the database layer reads stored JSON through them) and are re-exported here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from db.jsontext import SURROGATE

MAX_JSON_DEPTH = 64


class BadJSON(ValueError):
    pass


def unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def first_unencodable(value: Any) -> list[str | int] | None:
    """The path (keys and list indices) of the first string or key that UTF-8 cannot encode,
    or None. Iterative: a deeply nested value cannot exhaust the stack."""
    stack: list[tuple[list[str | int], Any]] = [([], value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if unencodable(node):
                return path
        elif isinstance(node, dict):
            for key, item in reversed(list(node.items())):
                if isinstance(key, str) and unencodable(key):
                    return [*path, SURROGATE.sub("\ufffd", key)]
                stack.append(([*path, key], item))
        elif isinstance(node, (list, tuple)):
            for index in range(len(node) - 1, -1, -1):
                stack.append(([*path, index], node[index]))
    return None


def loads_bounded(text: str | bytes, *, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """json.loads that gives BadJSON (a ValueError) for every way a hostile text can fail:
    syntax, nesting deeper than `max_depth` (checked before parsing, without recursion; with
    None, the parser's own recursion limit is caught instead), integers past Python's digit
    limit, text that is not UTF-8."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if max_depth is not None and json_depth(data) > max_depth:
        raise BadJSON(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise BadJSON("not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
        raise BadJSON(f"not usable JSON: {str(exc)[:200]}") from None


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings not counted. Each
    step is a C-speed pass over the bytes (strings cut out, all but brackets dropped, a running
    sum), so a megabyte of brackets costs milliseconds; no recursion."""
    import numpy as np

    brackets = _STRING.sub(b"", data).translate(_SQUARE, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.where(np.frombuffer(brackets, dtype=np.uint8) == ord("["), 1, -1)
    return int(np.cumsum(steps, dtype=np.int64).max())
