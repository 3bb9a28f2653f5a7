"""The webhook sender against a loopback receiver, on a SQLite database (the embedded
mode's): the private-address guard checks the resolved address, redirects are failures,
the retry schedule is the spec's and ends `failed`; and the routes' checks on a real API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api.webhooks import SCHEDULE_SECONDS, forbidden, literal_address, pass_once, retry_after
from convoy.settings import Settings
from db import jobs, webhooks
from db.migrate import upgrade
from db.session import session_scope
from db.tables import WebhookAttempt, WebhookDelivery
from tests.ops.receiver import start_receiver
from tests.reliability.infra import tiny_job
from tests.services import Stack, api_on_sqlite


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('hooks') / 'convoy.db'}"
    upgrade(url)
    return url


def canceled_job_delivery(db_url: str, url: str) -> str:
    """An endpoint at `url` and a job canceled: its delivery id (written with the cancel)."""
    with session_scope(db_url) as session:
        endpoint = webhooks.create(session, tenant="t", url=url, events=["job.canceled"])
        job = jobs.create_job(session, tenant="t", kind="train", name="n", request={},
                              summary=None, max_attempts=1)
        session.commit()
        jobs.cancel_job(session, job_id=job.id, tenant="t")
        return session.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.endpoint_id == endpoint.id)).one()


def attempts_of(db_url: str, delivery_id: str) -> tuple[str, list[WebhookAttempt]]:
    with session_scope(db_url) as session:
        state = session.get(WebhookDelivery, delivery_id).state  # type: ignore[union-attr]
        return state, list(session.scalars(select(WebhookAttempt).where(
            WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.attempt)))


def test_a_name_resolving_to_loopback_is_refused_when_the_guard_is_on(db_url, receiver):
    port = receiver.server.server_address[1]
    delivery = canceled_job_delivery(db_url, f"http://localhost:{port}/guard")
    settings = Settings(database_url=db_url, webhook_allow_private=False)
    assert pass_once(settings) == 1
    state, [attempt] = attempts_of(db_url, delivery)
    assert receiver.at("/guard") == []
    assert attempt.status is None and attempt.error.startswith("refused:")
    assert "loopback" in attempt.error and "CONVOY_WEBHOOK_ALLOW_PRIVATE" in attempt.error
    assert state == "pending"  # retried on the schedule (the guard may be lifted meanwhile)
    # with the guard off the same delivery goes through
    pass_once(Settings(database_url=db_url, webhook_allow_private=True))  # not due yet
    assert receiver.at("/guard") == []


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1",
                                     "169.254.169.254", "::1", "fe80::1", "fc00::1",
                                     "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"])
def test_private_addresses_are_named(address):
    assert forbidden(address)


def test_public_names_and_addresses_are_not_literal_refusals():
    assert literal_address("example.com") is None  # resolved at send time
    assert literal_address("8.8.8.8") == "8.8.8.8" and forbidden("8.8.8.8") is None
    assert literal_address("2002:808:808::") is not None and forbidden("2002:808:808::") is None


def test_public_addresses_pass():
    assert forbidden("93.184.216.34") is None and forbidden("2606:4700::1111") is None


def test_the_retry_schedule_is_the_specs_scaled_then_failed(db_url, receiver):
    assert [retry_after(Settings(), i) for i in range(8)] == [*SCHEDULE_SECONDS, None]
    assert retry_after(Settings(webhook_retry_scale=0.5), 1) == 150
    receiver.plans["/down"] = [503] * 20
    delivery = canceled_job_delivery(db_url, receiver.url + "/down")
    settings = Settings(database_url=db_url, webhook_allow_private=True,
                        webhook_retry_scale=1e-5)  # 0.05 ms ... 0.36 s, ~1 s in all
    state, deadline = "pending", time.monotonic() + 30
    while state == "pending" and time.monotonic() < deadline:
        pass_once(settings)
        state, tries = attempts_of(db_url, delivery)
        time.sleep(0.01)
    assert state == "failed" and len(tries) == 1 + len(SCHEDULE_SECONDS)
    assert [t.status for t in tries] == [503] * 8
    assert len(receiver.at("/down")) == 8


def test_a_redirect_is_a_failed_attempt_and_not_followed(db_url, receiver):
    receiver.plans["/moved"] = [302]
    delivery = canceled_job_delivery(db_url, receiver.url + "/moved")
    pass_once(Settings(database_url=db_url, webhook_allow_private=True))
    _, [attempt] = attempts_of(db_url, delivery)
    assert attempt.status == 302 and "not followed" in attempt.error
    assert receiver.at("/elsewhere") == []


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt_retried(db_url, receiver):
    receiver.plans["/slow"] = [-3]  # answers after 3 s; the timeout is 1 s
    delivery = canceled_job_delivery(db_url, receiver.url + "/slow")
    pass_once(Settings(database_url=db_url, webhook_allow_private=True,
                       webhook_timeout_seconds=1))
    state, [attempt] = attempts_of(db_url, delivery)
    assert state == "pending" and attempt.status is None
    assert attempt.error == "timed out after 1 s"
    assert attempt.duration_seconds < 2.5


def test_an_ipv6_literal_url_is_sent_with_a_bracketed_host_header(db_url):
    """`Host: ::1:PORT` (brackets lost) is no valid authority; servers answer it 400."""
    six = start_receiver("::1")
    try:
        port = six.server.server_address[1]
        delivery = canceled_job_delivery(db_url, f"http://[::1]:{port}/six")
        pass_once(Settings(database_url=db_url, webhook_allow_private=True))
        state, _ = attempts_of(db_url, delivery)
        assert state == "succeeded"
        [got] = six.at("/six")
        assert got.headers["host"] == f"[::1]:{port}"
    finally:
        six.server.shutdown()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_on_sqlite(Path(tmp_path_factory.mktemp("hooks-api")),
                       CONVOY_MAX_WEBHOOKS_PER_TENANT="3",
                       CONVOY_METRICS_PUBLIC="true") as stack:
        yield stack


@pytest.mark.parametrize("url, fragment", [
    ("http://127.0.0.1:9/x", "loopback"),
    ("http://[::1]/x", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://10.0.0.8/hook", "private"),
    ("ftp://example.com/x", "url"),
    ("http://user:pw@example.com/x", "credentials"),
    ("http://example.com:99999/x", "port"),
    ("https://example.com/" + "a" * 3000, "url"),
    # loopback in the forms resolvers accept, and localhost (RFC 6761): refused at creation
    # too, not only when a send resolves them (they were accepted with a 201)
    ("http://2130706433/x", "loopback"),
    ("http://0x7f000001/x", "loopback"),
    ("http://017700000001/x", "loopback"),
    ("http://127.1/x", "loopback"),
    ("http://0/x", "0.0.0.0"),
    ("http://localhost:8080/x", "loopback"),
    ("http://LocalHost./x", "loopback"),
    ("http://[2002:7f00:1::]/x", "loopback"),  # 6to4 around 127.0.0.1
    ("http://[::ffff:10.0.0.1]/x", "private"),
    ("http://[::1/x", "url: Invalid IPv6 URL"),  # named the field (its loc was [])
])
def test_create_refuses_bad_urls_with_the_field_named(api: Stack, url: str, fragment: str):
    with api.client() as c:
        r = c.post("/v1/webhooks", json={"url": url, "events": ["job.failed"]})
    assert r.status_code == 422, r.text
    assert fragment in str(r.json()["detail"])


def test_events_are_checked(api: Stack):
    with api.client() as c:
        for events in ([], ["job.exploded"], "job.failed"):
            r = c.post("/v1/webhooks", json={"url": "https://example.com/h", "events": events})
            assert r.status_code == 422 and "events" in str(r.json()["detail"])


def test_list_rotate_delete_and_tenants(api: Stack):
    with api.client() as c:
        made = c.post("/v1/webhooks", json={"url": "https://example.com/h",
                                            "events": ["job.failed", "job.failed"]}).json()
        assert made["events"] == ["job.failed"] and made["secret"].startswith("whsec_")
        listed = c.get("/v1/webhooks").json()
        assert [w["id"] for w in listed] == [made["id"]] and listed[0]["secret"] is None
        rotated = c.post(f"/v1/webhooks/{made['id']}/rotate").json()
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != made["secret"]
        other = c.post("/v1/tokens", json={"tenant": "other"}).json()["token"]
        with api.client(other) as o:
            assert o.get(f"/v1/webhooks/{made['id']}").status_code == 404
            assert o.delete(f"/v1/webhooks/{made['id']}").status_code == 404
            assert o.get(f"/v1/webhooks/{made['id']}/deliveries").status_code == 404
            assert o.get("/v1/webhooks").json() == []
        assert c.get(f"/v1/webhooks/{made['id']}/deliveries").json() == []
        for _ in range(2):
            c.post("/v1/webhooks", json={"url": "https://example.com/h",
                                         "events": ["job.failed"]})
        full = c.post("/v1/webhooks", json={"url": "https://example.com/h",
                                            "events": ["job.failed"]})
        assert full.status_code == 429 and "max_webhooks_per_tenant" in full.json()["detail"]
        assert c.delete(f"/v1/webhooks/{made['id']}").status_code == 204
        assert c.get(f"/v1/webhooks/{made['id']}").status_code == 404


def test_public_metrics_need_no_token_and_work_on_sqlite(api: Stack):
    with api.client() as c:
        c.post("/v1/jobs", json={**tiny_job(0), "name": "never-run"})  # no worker here
    r = httpx.get(api.url + "/metrics", timeout=30)
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("convoy_jobs", (("state", "queued"),))] == 1
    assert samples[("convoy_jobs_submitted_total", (("kind", "train"),))] == 1
    assert samples[("convoy_jobs_waiting", (("reason", "no_worker"),))] == 1
    assert samples[("convoy_queue_wait_seconds_count", ())] == 0


def test_requests_refused_before_routing_are_timed_under_their_route(api: Stack):
    """A body refused by a middleware (a lone surrogate: 422) never reaches the router; its
    request is still labelled with the route template (it was `unmatched`), and a path no
    route has stays `unmatched`."""
    with api.client() as c:
        r = c.post("/v1/jobs", content=b'{"kind": "train", "name": "\\ud800"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert c.get("/v1/no-such-thing").status_code == 404
    text = httpx.get(api.url + "/metrics", timeout=30).text
    counts = {tuple(sorted(s.labels.items())): s.value
              for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "convoy_http_request_duration_seconds_count"}
    assert counts.get((("method", "POST"), ("route", "/v1/jobs"), ("status", "422"))) == 1
    assert (("method", "POST"), ("route", "unmatched"), ("status", "422")) not in counts
    assert counts.get((("method", "GET"), ("route", "unmatched"), ("status", "404"))) == 1
