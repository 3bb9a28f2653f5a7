"""Per-tenant limits. Queued jobs: past max_queued_per_tenant a submit is 429 with Retry-After
(other tenants unaffected). Running jobs: a worker claims a job only while its tenant runs
fewer than max_running_per_tenant; otherwise the job stays queued and is deferred (the claim
itself: tests/db/test_transitions.py). Revoking the last admin token is refused."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.auth import create_token
from db.session import session_scope
from db.tokens import LastAdmin
from db.tokens import revoke as revoke_token
from tests.factories import digits_cnn, train_request
from tests.security.conftest import make_token
from tests.services import (
    REDIS,
    Stack,
    create_pg_database,
    drop_pg_database,
    stack_env,
    wait_job,
)


def test_queued_limit_is_429_with_retry_after(bare_api: Stack) -> None:
    with bare_api.client() as admin:
        a, b = make_token(admin, "q-a")["token"], make_token(admin, "q-b")["token"]
    with bare_api.client(a) as ca, bare_api.client(b) as cb:
        for _ in range(3):
            assert ca.post("/v1/jobs", json=train_request(1)).status_code == 201
        r = ca.post("/v1/jobs", json=train_request(1))
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert "max_queued_per_tenant" in r.json()["detail"]
        assert len(ca.get("/v1/jobs?state=queued").json()["items"]) == 3  # nothing half-made
        assert cb.post("/v1/jobs", json=train_request(1)).status_code == 201
        # Canceling one frees a place.
        first = ca.get("/v1/jobs").json()["items"][0]["id"]
        assert ca.post(f"/v1/jobs/{first}/cancel").status_code == 200
        assert ca.post("/v1/jobs", json=train_request(1)).status_code == 201


def test_last_admin_token_cannot_be_revoked(migrated_url: str) -> None:
    with session_scope(migrated_url) as s:
        first, _ = create_token(s, tenant="ops", is_admin=True)
        user, _ = create_token(s, tenant="ops")
        assert revoke_token(s, token_id=user.id) is not None  # users: always
        with pytest.raises(LastAdmin):
            revoke_token(s, token_id=first.id)
        second, _ = create_token(s, tenant="ops", is_admin=True)
        assert revoke_token(s, token_id=first.id).revoked_at is not None
        with pytest.raises(LastAdmin):
            revoke_token(s, token_id=second.id)
        assert revoke_token(s, token_id="nope") is None


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + two workers with max_running_per_tenant=1 and a short deferral."""
    home = Path(tmp_path_factory.mktemp("limit-stack"))
    url = create_pg_database()
    env = stack_env(home, database_url=url, broker_url=f"{REDIS}/0",
                    queue=f"convoy-limit-{uuid.uuid4().hex[:8]}",
                    CONVOY_MAX_RUNNING_PER_TENANT="1", CONVOY_TENANT_DEFER_SECONDS="0.5")
    s = Stack(env=env, home=home)
    try:
        # Both workers import torch at once, and the API starts meanwhile: this fixture costs
        # about one worker start, not three process starts in a row.
        starts = [threading.Thread(target=s.start_worker, args=(n,)) for n in ("w0", "w1")]
        for t in starts:
            t.start()
        s.start_api()
        for t in starts:
            t.join(timeout=120)
        assert len(s.workers) == 2
        # the workers' start-up warm-up over, so both take their first message at once
        for name in ("w0", "w1"):
            deadline = time.monotonic() + 60
            while "warm-up done" not in s.log_text(name) and time.monotonic() < deadline:
                time.sleep(0.05)
        yield s
    finally:
        for w in s.workers:  # nothing left to finish: no warm shutdown to wait for
            Stack.kill(w, signal.SIGKILL)
        s.stop()
        drop_pg_database(url)


def test_running_limit_end_to_end(two_workers: Stack) -> None:
    """Tenant A submits two jobs, then B one; two idle workers. A never has two running at
    once, B's job is not held up behind A's second one, and every job finishes."""
    with two_workers.client() as admin:
        a, b = make_token(admin, "run-a")["token"], make_token(admin, "run-b")["token"]
    with two_workers.client(a) as ca, two_workers.client(b) as cb:
        job = train_request(6, model=digits_cnn(8))  # still running when A's second is tried
        a_ids = [ca.post("/v1/jobs", json=job).json()["id"] for _ in range(2)]
        b_id = cb.post("/v1/jobs", json=job).json()["id"]
        most_a_running = 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = [ca.get(f"/v1/jobs/{i}").json()["state"] for i in a_ids]
            most_a_running = max(most_a_running, states.count("running"))
            if all(s in ("succeeded", "failed", "canceled") for s in states):
                break
            time.sleep(0.05)
        done_a = [wait_job(ca, i) for i in a_ids]
        done_b = wait_job(cb, b_id)
    assert [j["state"] for j in done_a] == ["succeeded", "succeeded"], done_a
    assert done_b["state"] == "succeeded", done_b
    assert most_a_running == 1
    first, second = sorted(done_a, key=lambda j: j["started_at"])
    assert second["started_at"] >= first["finished_at"]  # strictly one after the other
    assert done_b["started_at"] < second["started_at"]  # B was served while A waited
    logs = two_workers.log_text("w0") + two_workers.log_text("w1")
    assert "deferred" in logs
