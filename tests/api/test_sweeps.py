"""Sweeps (issue 20) on a real stack: PostgreSQL, Redis, the API (with its sweep driver) and
three Celery workers, shared by every test here."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.factories import digits_cnn, train_request
from tests.services import REDIS, ROOT, TOKEN, Stack, stack_env, wait_job

SPACE = {"train.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
         "train.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
         "model.layers.0.out_channels": {"type": "int", "low": 2, "high": 8}}
EPOCHS_PRUNE = 60


@pytest.fixture(scope="module")
def sweep_stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("sweeps")
    env = stack_env(home, database_url=pg_url, broker_url=f"{REDIS}/0",
                    queue=f"convoy-sweeps-{uuid.uuid4().hex[:8]}",
                    CONVOY_SWEEP_INTERVAL_SECONDS="0.3", CONVOY_WORKER_WARM_UP="false")
    s = Stack(env=env, home=Path(home))
    try:
        s.start_api()
        for _ in range(3):  # one more than any test's `parallel`
            s.start_worker()
        yield s
    finally:
        s.stop()


@pytest.fixture
def sc(sweep_stack: Stack) -> Iterator[httpx.Client]:
    with sweep_stack.client() as c:
        yield c


def sweep_body(**fields: Any) -> dict[str, Any]:
    base = train_request(2, model=digits_cnn(4))
    base.pop("kind")
    return {"name": "digits-lr", "base": base, "space": SPACE,
            "objective": {"metric": "val_accuracy", "mode": "max"},
            "trials": 6, "parallel": 2, "sampler": "random", "seed": 0, **fields}


def wait_sweep(client: httpx.Client, sweep_id: str, timeout: float = 240,
               until: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sweep = client.get(f"/v1/sweeps/{sweep_id}").json()
        except httpx.TransportError:  # the API restarting
            time.sleep(0.3)
            continue
        if (until(sweep) if until else sweep["state"] != "running"):
            return sweep
        time.sleep(0.3)
    raise TimeoutError(f"sweep {sweep_id}: {sweep['state']} after {timeout}s")


def attempts_of(pg_url: str, job_ids: list[str]) -> list[tuple[Any, Any]]:
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute("SELECT started_at, ended_at FROM job_attempts WHERE job_id = ANY(%s)",
                            (job_ids,)).fetchall()


def attempt_outcomes(pg_url: str, job_id: str) -> list[str | None]:
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return [o for (o,) in conn.execute(
            "SELECT outcome FROM job_attempts WHERE job_id = %s ORDER BY attempt", (job_id,))]


def test_random_sweep_finishes_within_its_space_and_parallel(sc: httpx.Client, pg_url: str):
    r = sc.post("/v1/sweeps", json=sweep_body())
    assert r.status_code == 201, r.text
    sweep = wait_sweep(sc, r.json()["id"])
    assert sweep["state"] == "succeeded", sweep
    trials = sweep["trials"]
    assert [t["number"] for t in trials] == list(range(6))
    assert len({t["job_id"] for t in trials}) == 6
    values = []
    for t in trials:
        p = t["params"]
        assert 0.01 <= p["train.lr"] <= 0.3
        assert p["train.batch_size"] in (32, 64, 128)
        assert isinstance(p["model.layers.0.out_channels"], int)
        assert 2 <= p["model.layers.0.out_channels"] <= 8
        job = sc.get(f"/v1/jobs/{t['job_id']}").json()
        assert job["sweep_id"] == sweep["id"]
        assert job["state"] == t["state"] == "succeeded"
        # the job ran with the trial's params
        assert job["request"]["train"]["lr"] == p["train.lr"]
        assert job["request"]["train"]["batch_size"] == p["train.batch_size"]
        assert job["request"]["model"]["layers"][0]["out_channels"] == \
            p["model.layers.0.out_channels"]
        assert t["value"] == job["result"]["val_accuracy"]
        assert t["epochs"] == 2 and not t["pruned"]
        values.append((job["result"]["val_accuracy"], t["job_id"]))
    best_value = max(v for v, _ in values)
    assert sweep["best"]["value"] == best_value
    # on a tie, the earliest trial
    assert sweep["best"]["job_id"] == next(j for v, j in values if v == best_value)
    assert sweep["best"]["params"] == trials[sweep["best"]["number"]]["params"]
    assert sweep["progress"] == 1.0
    # at most `parallel` trials ran at once: from the attempts' start and end times
    spans = attempts_of(pg_url, [t["job_id"] for t in trials])
    assert len(spans) >= 6 and all(end is not None for _, end in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert 1 <= peak <= 2
    listed = sc.get("/v1/sweeps").json()["items"]
    assert sweep["id"] in [s["id"] for s in listed]


def test_hopeless_trial_is_pruned_before_its_last_epoch(sc: httpx.Client, pg_url: str):
    base = sweep_body()["base"]
    # epochs of a few tens of ms each: enough of them that the driver (a pass every 0.3 s)
    # sees the hopeless trial between two of its epochs whatever the machine's load
    base["train"]["epochs"] = EPOCHS_PRUNE
    base["checkpoints"] = {"keep_last": None}  # every epoch's checkpoint (retention: issue 18)
    # seed 0's grid order is lr 0.1, then 1e-6 (cannot learn), then 0.2; parallel 1 so the
    # median pruner has the first trial's curve to compare with
    body = sweep_body(base=base, sampler="grid", trials=3, parallel=1,
                      space={"train.lr": {"type": "categorical", "choices": [0.2, 1e-6, 0.1]}},
                      pruner={"type": "median", "min_epochs": 1, "startup_trials": 1})
    r = sc.post("/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = wait_sweep(sc, r.json()["id"])
    assert sweep["state"] == "succeeded", sweep
    by_lr = {t["params"]["train.lr"]: t for t in sweep["trials"]}
    assert set(by_lr) == {0.2, 1e-6, 0.1}
    hopeless = by_lr[1e-6]
    assert hopeless["number"] == 1, "the grid order changed"
    assert hopeless["pruned"] is True
    assert 1 <= hopeless["epochs"] < EPOCHS_PRUNE
    job = sc.get(f"/v1/jobs/{hopeless['job_id']}").json()
    assert job["state"] == "succeeded"
    assert job["result"]["pruned"] is True
    assert job["result"]["epochs_done"] == hopeless["epochs"]
    # its checkpoints are kept, one per epoch it recorded, as the result says
    checkpoints = sc.get(f"/v1/jobs/{hopeless['job_id']}/checkpoints").json()
    assert [c["epoch"] for c in checkpoints] == list(range(1, hopeless["epochs"] + 1))
    assert sc.get(f"/v1/jobs/{hopeless['job_id']}/checkpoints/last").status_code == 200
    logs = sc.get(f"/v1/jobs/{hopeless['job_id']}/logs").json()
    assert any("pruned after epoch" in line["message"] for line in logs)
    # its worker stopped between two steps and ended the attempt as the job ended
    deadline = time.monotonic() + 30
    while (outcomes := attempt_outcomes(pg_url, hopeless["job_id"])) == [None]:
        assert time.monotonic() < deadline, "the attempt was never closed"
        time.sleep(0.2)
    assert outcomes == ["succeeded"]
    # a pruned trial is never the best
    assert sweep["best"]["params"]["train.lr"] != 1e-6
    assert not by_lr[0.1]["pruned"]


def test_api_killed_mid_sweep_starts_no_trial_twice(sweep_stack: Stack, sc: httpx.Client,
                                                     pg_url: str):
    r = sc.post("/v1/sweeps", json=sweep_body(trials=4, parallel=2, seed=7))
    sweep_id = r.json()["id"]
    wait_sweep(sc, sweep_id, until=lambda s: len(s["trials"]) >= 2)
    assert sweep_stack.api is not None
    sweep_stack.kill(sweep_stack.api, signal.SIGKILL)
    sweep_stack.start_api()
    sweep = wait_sweep(sc, sweep_id)
    assert sweep["state"] == "succeeded", sweep
    assert [t["number"] for t in sweep["trials"]] == [0, 1, 2, 3]
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        jobs = conn.execute("SELECT id FROM jobs WHERE sweep_id = %s", (sweep_id,)).fetchall()
    assert sorted(j for (j,) in jobs) == sorted(t["job_id"] for t in sweep["trials"])
    assert all(t["state"] == "succeeded" for t in sweep["trials"])


def test_cancel_cancels_queued_and_running_trials(sc: httpx.Client):
    base = sweep_body()["base"]
    base["train"]["epochs"] = 50
    r = sc.post("/v1/sweeps", json=sweep_body(base=base, trials=5, parallel=2))
    sweep_id = r.json()["id"]
    wait_sweep(sc, sweep_id, until=lambda s: any(t["state"] == "running" for t in s["trials"]))
    r = sc.post(f"/v1/sweeps/{sweep_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "canceled"
    for t in r.json()["trials"]:
        assert wait_job(sc, t["job_id"])["state"] == "canceled"
    time.sleep(1)  # a few driver passes: no new trial for a canceled sweep
    after = sc.get(f"/v1/sweeps/{sweep_id}").json()
    assert after["state"] == "canceled"
    assert len(after["trials"]) == len(r.json()["trials"]) <= 2
    assert sc.post(f"/v1/sweeps/{sweep_id}/cancel").status_code == 409


BAD = [
    ({"space": {"train.nope": {"type": "float", "low": 0.1, "high": 0.2}}},
     ["body", "space", "train.nope"]),
    ({"space": {"train.optimizer": {"type": "float", "low": 0.1, "high": 0.2}}},
     ["body", "space", "train.optimizer"]),
    ({"space": {"model.layers.9.out_channels": {"type": "int", "low": 1, "high": 4}}},
     ["body", "space", "model.layers.9.out_channels"]),
    ({"space": {"train.batch_size": {"type": "categorical", "choices": []}}},
     ["body", "space", "train.batch_size", "categorical", "choices"]),
    ({"space": {"train.lr": {"type": "float", "low": 0.3, "high": 0.01}}},
     ["body", "space", "train.lr", "float"]),
    ({"trials": 0}, ["body", "trials"]),
    ({"trials": 100_000}, ["body", "trials"]),
    ({"parallel": 0}, ["body", "parallel"]),
    # a bound that makes the model invalid: a 0-channel convolution, a lr above the limit
    ({"space": {"model.layers.0.out_channels": {"type": "int", "low": 0, "high": 4}}},
     ["body", "space", "model.layers.0.out_channels", "low"]),
    ({"space": {"train.lr": {"type": "float", "low": 0.1, "high": 50}}},
     ["body", "space", "train.lr", "high"]),
    ({"space": {"train.batch_size": {"type": "float", "low": 8, "high": 64}}},
     ["body", "space", "train.batch_size", "type"]),
    ({"sampler": "grid", "space": {"train.lr": {"type": "float", "low": 0.1, "high": 0.2}}},
     ["body", "space", "train.lr", "type"]),
    ({"sampler": "grid", "trials": 5,
      "space": {"train.lr": {"type": "categorical", "choices": [0.1, 0.2]}}},
     ["body", "trials"]),
    ({"base": {"model": digits_cnn(4), "dataset": {"name": "digits"},
               "train": {"epochs": 0}}}, ["body", "base", "train", "epochs"]),
]


@pytest.mark.parametrize(("change", "loc"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_sweeps_get_422_naming_the_field(sc: httpx.Client, change: dict[str, Any],
                                             loc: list[Any]):
    r = sc.post("/v1/sweeps", json=sweep_body(**change))
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert loc in locs or any(found[:len(loc)] == loc for found in locs), locs


def test_unknown_sweep_is_404(sc: httpx.Client):
    assert sc.get("/v1/sweeps/ffff").status_code == 404
    assert sc.post("/v1/sweeps/ffff/cancel").status_code == 404


def test_cli_sweep_submit_waits_with_a_progress_of_trials(sweep_stack: Stack, tmp_path: Path):
    body = sweep_body(trials=2, parallel=2, seed=3)
    body["base"]["train"]["epochs"] = 1
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps(body))
    env = {**sweep_stack.env, "CONVOY_URL": sweep_stack.url, "CONVOY_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-m", "cli.main", "sweep", "submit", str(spec),
                           "--wait"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    sweep_id = done.stdout.split()[2]
    assert "2/2 trials" in done.stderr  # the progress line, one per change when piped
    sweep = sweep_stack.client().get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["state"] == "succeeded"
    assert f"best: trial {sweep['best']['number']} job {sweep['best']['job_id']}" in done.stdout


def test_idempotency_key_gives_the_same_sweep(sc: httpx.Client):
    body = sweep_body(trials=1, parallel=1)
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    first = sc.post("/v1/sweeps", json=body, headers=headers)
    again = sc.post("/v1/sweeps", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = sc.post("/v1/sweeps", json={**body, "seed": 5}, headers=headers)
    assert other.status_code == 409
    assert sc.post(f"/v1/sweeps/{first.json()['id']}/cancel").status_code in (200, 409)


def test_the_example_sweep_is_accepted(sc: httpx.Client):
    body = json.loads((ROOT / "examples" / "sweeps" / "digits-sweep.json").read_text())
    r = sc.post("/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["trials_total"] == 8
    assert sc.post(f"/v1/sweeps/{r.json()['id']}/cancel").status_code == 200


def test_another_tenants_sweep_is_not_found(sweep_stack: Stack, sc: httpx.Client):
    r = sc.post("/v1/sweeps", json=sweep_body(trials=1, parallel=1))
    sweep_id = r.json()["id"]
    secret = sc.post("/v1/tokens", json={"tenant": "other", "name": "o"}).json()["token"]
    with sweep_stack.client(secret) as other:
        assert other.get(f"/v1/sweeps/{sweep_id}").status_code == 404
        assert other.post(f"/v1/sweeps/{sweep_id}/cancel").status_code == 404
        assert sweep_id not in [s["id"] for s in other.get("/v1/sweeps").json()["items"]]
    assert sc.post(f"/v1/sweeps/{sweep_id}/cancel").status_code in (200, 409)
