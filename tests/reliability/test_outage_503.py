"""During a database outage the data routes answered 500 text/plain. Now each answers 503 JSON
with Retry-After (whether the token check or the route's own query meets the outage first),
/readyz says which check failed, and everything answers again once the database is back. A bad
token seen lately is refused from the API's cache (no database trip), so it is a 401 even
then."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.infra import PrivatePostgres, make_stack, stop_fast, wait_for
from tests.services import REDIS, Stack

ROUTES = [("GET", "/v1/jobs"), ("GET", "/v1/datasets"), ("GET", "/v1/jobs/0123456789abcdef"),
          ("GET", "/v1/jobs/0123456789abcdef/metrics"), ("GET", "/v1/tokens")]


@pytest.fixture(scope="module")
def outage_api(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Stack, PrivatePostgres]]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        stack = make_stack(Path(tmp_path_factory.mktemp("outage503")),
                           database_url=pg.create_database(), broker_url=f"{REDIS}/0",
                           auth_miss_cache_seconds=60)  # longer than stopping PostgreSQL takes
        try:
            stack.start_api()
            yield stack, pg
        finally:
            stop_fast(stack)
    finally:
        pg.destroy()


def _assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.request.url, r.status_code, r.text[:200])
    assert r.headers["content-type"] == "application/json"
    assert "database" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 0


def test_data_routes_answer_503_json_with_retry_after_while_the_database_is_down(outage_api):
    stack, pg = outage_api
    bad = {"Authorization": "Bearer cvy_made-up-" + uuid.uuid4().hex}
    with stack.client() as client:
        for method, path in ROUTES:
            assert client.request(method, path).status_code in (200, 404)
        assert client.get("/v1/jobs", headers=bad).status_code == 401
        pg.stop()
        try:
            t0 = time.monotonic()
            # A bad token seen lately costs no database trip at all: it is
            # still a 401 with the database gone; a new one needs the lookup, and gets 503.
            for _ in range(3):
                assert client.get("/v1/jobs", headers=bad).status_code == 401
                assert client.get("/v1/datasets", headers=bad).status_code == 401
            _assert_503(client.get("/v1/jobs", headers={"Authorization": "Bearer cvy_new"}))
            for method, path in ROUTES:  # the route's query meets the outage
                _assert_503(client.request(method, path))
            time.sleep(1.5)  # past the token cache: the token check meets it
            for method, path in ROUTES:
                _assert_503(client.request(method, path))
            _assert_503(client.post("/v1/jobs", json={"kind": "train"}))
            assert time.monotonic() - t0 < 20  # no request stalled on the way
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"].startswith("error")
        finally:
            pg.start()
        wait_for(lambda: client.get("/v1/jobs").status_code == 200, timeout=30,
                 what="the API answers again")
        for method, path in ROUTES:
            assert client.request(method, path).status_code in (200, 404)
        assert client.get("/readyz").status_code == 200
