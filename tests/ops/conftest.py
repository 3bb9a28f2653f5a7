"""The loopback webhook receiver, one per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ops.receiver import Receiver, start_receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = start_receiver()
    yield r
    r.server.shutdown()
