"""Strings turned into numbers take ASCII digits only. `str.isdigit()` and `re`'s `\\d` are
true for Unicode digits ("٣", Arabic-Indic three; "３", fullwidth; `isdigit()` also for "¹"),
and `int()`/`float()` read most of them as numbers: a layer reference "٣" once named layer 3
and "¹" made a 500 (those cases are tests/security/test_hostile_values.py's). Here, without a
server, the other places a user's string becomes a number: the event stream's Last-Event-ID
cursor, the SDK's reading of Retry-After, and the `convoy` command's numeric options."""

from __future__ import annotations

import argparse

import httpx
import pytest
from fastapi import HTTPException

from api.routes.events import Cursor
from cli.main import build_parser
from client.commands import ascii_float, ascii_int
from client.sdk import _retry_after
from convoy.featuremaps import is_index, resolve_layers

UNICODE_DIGITS = ["٣", "３", "¹", "²0", "0٣", "߃", "१"]


@pytest.mark.parametrize("text", UNICODE_DIGITS)
def test_is_index_and_layer_resolution_take_ascii_digits_only(text: str) -> None:
    assert not is_index(text)
    summary = {"layers": [{"index": i, "type": "relu"} for i in range(12)]}
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_layers(summary, [text])
    assert resolve_layers(summary, ["3", "0-relu"]) == [0, 3]


@pytest.mark.parametrize("raw", ["٣-0-0", "0-٣-0", "0-0-٣", "３-0-0", "¹-0-0", "0-0-1٠"])
def test_last_event_id_in_unicode_digits_is_422(raw: str) -> None:
    with pytest.raises(HTTPException) as info:
        Cursor.parse(raw)
    assert info.value.status_code == 422
    assert "Last-Event-ID" in str(info.value.detail)


def test_last_event_id_in_ascii_digits_still_parses() -> None:
    cursor = Cursor.parse("3-17-5000")
    assert (cursor.states, cursor.metric_id, cursor.progress) == (3, 17, 5000)
    assert str(cursor) == "3-17-5000"


@pytest.mark.parametrize(("header", "seconds"), [
    ("2", 2.0), ("0.5", 0.5), ("120", 10.0), ("-3", 0.0),
    # not a number of seconds: the default, never a crash or a NaN sleep
    ("٣", 1.5), ("³", 1.5), ("nan", 1.5), ("inf", 1.5), ("1e400", 1.5), ("", 1.5),
    ("Wed, 21 Oct 2026 07:28:00 GMT", 1.5), ("1_0", 1.5),
])
def test_sdk_reads_retry_after_as_ascii_seconds(header: str, seconds: float) -> None:
    response = httpx.Response(503, headers={"Retry-After": header.encode("utf-8")})
    assert _retry_after(response, 1.5) == seconds


@pytest.mark.parametrize("argv", [
    ["jobs", "--limit", "٣"], ["jobs", "--limit", "３"], ["submit", "x.json", "--epochs", "¹"],
    ["api", "--port", "８０"], ["api", "--header-timeout", "٣"], ["api", "--keep-alive", "1_0"],
    ["api", "--max-connections", "nan"], ["api", "--header-timeout", "inf"],
])
def test_cli_numbers_take_ascii_digits_only(argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "ASCII" in capsys.readouterr().err


def test_cli_numbers_in_ascii_still_parse() -> None:
    args = build_parser().parse_args(["jobs", "--limit", "7"])
    assert args.limit == 7
    args = build_parser().parse_args(["api", "--port", "8001", "--header-timeout", "2.5"])
    assert (args.port, args.header_timeout) == (8001, 2.5)
    assert ascii_int(" 12 ") == 12 and ascii_int("-4") == -4
    assert ascii_float("1e3") == 1000.0 and ascii_float(".5") == 0.5
    for bad in ("", "1.5", "٣"):
        with pytest.raises(argparse.ArgumentTypeError):
            ascii_int(bad)
