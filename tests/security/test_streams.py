"""Long-lived event streams.

- A revoked token's open stream used to go on sending events; now the stream re-checks its
  token (and the job's tenant) every couple of seconds and ends within 5 s of a revocation.
- Open streams are capped per tenant and in total: past a cap, 429 JSON with Retry-After, and
  a closed stream gives its slot back.
- `Last-Event-ID: 0-9999999999999999999-0` crashed the stream with an overflow; an id out of
  range is now refused like a malformed one: 422 naming the header.

An API with no worker: the jobs stay queued, so their streams stay open as long as we like.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.factories import train_request
from tests.reliability.infra import api_without_workers
from tests.security.conftest import make_token
from tests.services import Stack

PER_TENANT = 2
TOTAL = 3


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("streams")),
                             max_streams_per_tenant=PER_TENANT,
                             max_streams_total=TOTAL) as stack:
        yield stack


def tenant(stack: Stack, name: str) -> tuple[str, str]:
    """(token id, secret) of a new token of tenant `name`."""
    with stack.client() as admin:
        made = make_token(admin, name)
    return made["id"], made["token"]


def queued_job(stack: Stack, secret: str) -> str:
    with stack.client(secret) as c:
        r = c.post("/v1/jobs", json=train_request(1))
        assert r.status_code == 201, r.text
        return r.json()["id"]


def open_stream(stack: Stack, stack_: ExitStack, job_id: str, secret: str) -> httpx.Response:
    client = stack_.enter_context(httpx.Client(base_url=stack.url, timeout=30))
    return stack_.enter_context(client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {secret}"}))


class Reader:
    """Reads a stream's lines on a thread until it ends, noting when it ended."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines: list[str] = []
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(response,), daemon=True)
        self._thread.start()

    def _run(self, response: httpx.Response) -> None:
        try:
            for line in response.iter_lines():
                self.lines.append(line)
        except httpx.HTTPError as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.ended_at is not None


def test_a_revoked_tokens_stream_ends_within_5_s(api):
    token_id, secret = tenant(api, "stream-revoke")
    job_id = queued_job(api, secret)
    with ExitStack() as streams:
        r = open_stream(api, streams, job_id, secret)
        assert r.status_code == 200
        reader = Reader(r)
        deadline = time.monotonic() + 10
        while "event: state" not in reader.lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "event: state" in reader.lines, reader.lines  # the stream is live
        assert not reader.wait(2.5), "the stream ended before the token was revoked"
        with api.client() as admin:
            assert admin.delete(f"/v1/tokens/{token_id}").status_code == 200
        revoked_at = time.monotonic()
        assert reader.wait(8), "the stream of a revoked token is still open after 8 s"
        assert reader.ended_at is not None and reader.ended_at - revoked_at < 5.0
        assert "event: error" in reader.lines
    # ...and it cannot be opened again
    again = httpx.get(f"{api.url}/v1/jobs/{job_id}/events",
                      headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert again.status_code == 401


def test_open_streams_are_capped_per_tenant_and_in_total(api):
    _, a = tenant(api, "stream-cap-a")
    _, b = tenant(api, "stream-cap-b")
    job_a, job_b = queued_job(api, a), queued_job(api, b)
    with ExitStack() as streams:
        for _ in range(PER_TENANT):
            assert open_stream(api, streams, job_a, a).status_code == 200
        over = httpx.get(f"{api.url}/v1/jobs/{job_a}/events",
                         headers={"Authorization": f"Bearer {a}"}, timeout=10)
        assert over.status_code == 429
        assert "max_streams_per_tenant" in over.json()["detail"]
        assert int(over.headers["retry-after"]) > 0
        # another tenant still gets a stream, up to the total
        assert open_stream(api, streams, job_b, b).status_code == 200
        full = httpx.get(f"{api.url}/v1/jobs/{job_b}/events",
                         headers={"Authorization": f"Bearer {b}"}, timeout=10)
        assert full.status_code == 429
        assert "max_streams_total" in full.json()["detail"]
        assert int(full.headers["retry-after"]) > 0
        # ordinary requests are not affected
        with api.client(a) as c:
            assert c.get(f"/v1/jobs/{job_a}").status_code == 200
    # every stream closed: their slots are back (the server sees the disconnects shortly)
    deadline = time.monotonic() + 10
    with ExitStack() as streams:
        while True:
            r = open_stream(api, streams, job_a, a)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 200


@pytest.mark.parametrize("last_id", ["0-9999999999999999999-0", "0-9223372036854775808-0",
                                     "0-0-99999"])
def test_an_out_of_range_last_event_id_is_a_422_naming_the_header(api, last_id):
    _, secret = tenant(api, "stream-ids")
    job_id = queued_job(api, secret)
    r = httpx.get(f"{api.url}/v1/jobs/{job_id}/events", timeout=10,
                  headers={"Authorization": f"Bearer {secret}", "Last-Event-ID": last_id})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
    # the largest id the database can hold is still a valid place to resume from
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", timeout=10,
                      headers={"Authorization": f"Bearer {secret}",
                               "Last-Event-ID": "1-9223372036854775807-0"}) as ok:
        assert ok.status_code == 200
