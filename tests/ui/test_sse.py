"""GET /v1/jobs/{id}/events against the live stack: every state in order, one metric event per
epoch, and Last-Event-ID resumes without repeats."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from api.routes.events import state_history
from client import Convoy, Event
from db.tables import Job, JobAttempt
from tests.factories import train_request
from tests.services import TOKEN

EPOCHS = 3


def states(events: list[Event]) -> list[str]:
    return [e.data["state"] for e in events if e.type == "state"]


def metric_epochs(events: list[Event]) -> list[int]:
    return [e.data["epoch"] for e in events if e.type == "metric"]


def test_stream_from_submission_sees_every_state_and_one_metric_event_per_epoch(stack):
    with Convoy(stack.url, TOKEN) as convoy:
        job = convoy.submit(train_request(EPOCHS))
        events = list(convoy.events(job.id, reconnect=False))

        assert states(events) == ["queued", "running", "succeeded"]
        assert events[-1].type == "state" and events[-1].data["result"]["epochs_done"] == EPOCHS
        assert metric_epochs(events) == list(range(1, EPOCHS + 1))
        for e in events:
            if e.type == "metric":
                assert {"train_loss", "val_loss", "val_accuracy"} <= set(e.data["values"])
        progress = [e.data["progress"] for e in events if e.type == "progress"]
        assert progress == sorted(progress) and progress[-1] == 1.0
        # states come before and after the metrics, never in between them
        kinds = [e.type for e in events if e.type != "progress"]
        assert kinds == ["state", "state", *["metric"] * EPOCHS, "state"]
        assert len({e.id for e in events}) == len(events)

        # The stream of a finished job replays its history; from any id it resumes exactly.
        replay = list(convoy.events(job.id, reconnect=False))
        assert [(e.type, e.data) for e in replay if e.type != "progress"] == \
            [(e.type, e.data) for e in events if e.type != "progress"]
        for i in range(len(replay) - 1):
            rest = list(convoy.events(job.id, last_event_id=replay[i].id, reconnect=False))
            assert rest == replay[i + 1:]


def test_a_dropped_stream_resumes_with_last_event_id_without_repeats(stack):
    with Convoy(stack.url, TOKEN) as convoy:
        job = convoy.submit(train_request(EPOCHS))
        first: list[Event] = []
        for event in convoy.events(job.id, reconnect=False):
            first.append(event)
            if event.type == "metric":
                break  # the connection is closed here, mid-job
        rest = list(convoy.events(job.id, last_event_id=first[-1].id, reconnect=False))
        events = first + rest
        assert states(events) == ["queued", "running", "succeeded"]
        assert metric_epochs(events) == list(range(1, EPOCHS + 1))


def test_a_canceled_job_ends_its_stream_with_canceled(stack):
    with Convoy(stack.url, TOKEN) as convoy:
        job = convoy.submit(train_request(500))
        events: list[Event] = []
        for event in convoy.events(job.id, reconnect=False):
            events.append(event)
            if event.type == "state" and event.data["state"] == "running":
                assert convoy.cancel(job.id).state == "canceled"
        assert states(events) == ["queued", "running", "canceled"]
        assert events[-1].type == "state"


def test_events_need_a_token_a_known_job_and_a_valid_last_event_id(stack, client):
    job_id = client.post("/v1/jobs", json=train_request(1)).json()["id"]
    anonymous = httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", timeout=30)
    assert anonymous.status_code == 401
    assert client.get("/v1/jobs/ffffffff/events").status_code == 404
    bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x; DROP"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
    # EventSource cannot send headers, so the token may come as a query parameter here.
    with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", params={"token": TOKEN},
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    assert "event: state" in body and '"state": "succeeded"' in body
    # ...and the secret stays out of the access log, which still shows the request
    log = stack.log_text("api")
    assert f"/v1/jobs/{job_id}/events?token=[redacted]" in log
    assert TOKEN not in log


def _job(state: str, attempt: int) -> Job:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return Job(id="j", state=state, attempt=attempt, created_at=at, updated_at=at,
               finished_at=at if state in ("succeeded", "failed", "canceled") else None,
               error=None, result=None)


def _attempt(n: int, outcome: str | None) -> JobAttempt:
    at = datetime(2026, 1, 1, 0, 0, n, tzinfo=UTC)
    return JobAttempt(job_id="j", attempt=n, worker_id=f"w{n}", started_at=at,
                      ended_at=at if outcome else None, outcome=outcome)


def test_state_history_shows_a_requeue_after_a_lost_worker():
    lost = _attempt(1, "lease_expired")
    assert [h["state"] for h in state_history(_job("queued", 2), [lost])] == [
        "queued", "running", "queued"]
    history = state_history(_job("succeeded", 2), [lost, _attempt(2, "succeeded")])
    assert [(h["state"], h["attempt"]) for h in history] == [
        ("queued", 1), ("running", 1), ("queued", 2), ("running", 2), ("succeeded", 2)]
    # the last allowed attempt lost its worker: failed, with no requeue in between
    assert [h["state"] for h in state_history(_job("failed", 1), [lost])] == [
        "queued", "running", "failed"]
    assert [h["state"] for h in state_history(_job("canceled", 1), [])] == ["queued", "canceled"]


def test_state_history_shows_a_job_handed_back_by_a_stopping_worker_as_queued():
    released = _attempt(1, "released")
    assert [(h["state"], h["attempt"]) for h in state_history(_job("queued", 2), [released])] == [
        ("queued", 1), ("running", 1), ("queued", 2)]
    history = state_history(_job("succeeded", 2), [released, _attempt(2, "succeeded")])
    assert [h["state"] for h in history] == ["queued", "running", "queued", "running",
                                             "succeeded"]


def test_access_log_redaction_reads_keys_as_starlette_does():
    from api.app import RedactTokens

    redact = RedactTokens.redact
    assert redact("/v1/jobs/j/events?token=cvy_s") == "/v1/jobs/j/events?token=[redacted]"
    # percent-encoded or upper-case keys are the same parameter to the server
    assert redact("/e?a=1&%74oken=cvy_s&b=2") == "/e?a=1&%74oken=[redacted]&b=2"
    assert redact("/e?TOKEN=cvy_s") == "/e?TOKEN=[redacted]"
    # a key that merely starts with `token` is redacted too; a value `token` is not a key
    assert redact("/e?tokens=1&x=token") == "/e?tokens=[redacted]&x=token"
    assert redact("/v1/jobs") == "/v1/jobs"
