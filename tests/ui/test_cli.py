"""The `convoy` client commands against the live stack, run as a user runs them: a subprocess
with CONVOY_URL and CONVOY_TOKEN in its environment."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.factories import digits_cnn, train_request
from tests.services import ROOT, TOKEN

EXAMPLES = ROOT / "examples"


def convoy(stack, *args: str, timeout: float = 180, token: str = TOKEN
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONVOY_URL": stack.url, "CONVOY_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def convoy_admin(stack, *args: str) -> subprocess.CompletedProcess[str]:
    """A server-side command (`convoy token ...`): it reads the stack's database settings."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=stack.env,
                          capture_output=True, text=True, timeout=60)


def submitted_id(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"job ([0-9a-f]{32}) succeeded", done.stdout)
    assert match, done.stdout + done.stderr
    return match.group(1)


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory) -> str:
    """A 2-epoch train job run to `succeeded` through `convoy submit --wait`."""
    spec = tmp_path_factory.mktemp("spec") / "two-epochs.json"
    spec.write_text(json.dumps(train_request(2)))
    return submitted_id(convoy(stack, "submit", str(spec), "--wait"))


def test_submit_wait_shows_progress_and_ends_with_the_result(stack, tmp_path):
    done = convoy(stack, "submit", str(EXAMPLES / "digits-cnn.json"), "--wait", "--epochs", "2",
                  "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"job ([0-9a-f]{32}) succeeded in [\d.]+s: val_accuracy (0\.\d+), "
                         r"val_loss [\d.]+, 2 epochs", last)
    assert match, last
    assert float(match.group(2)) > 0.8
    # piped (not a terminal): one progress line per state and per epoch
    assert re.search(r"\] +\d+%  running  epoch 2/2  loss [\d.]+  val_acc [\d.]+%", done.stderr)
    job_id = match.group(1)

    status = convoy(stack, "status", job_id)
    assert status.returncode == 0 and "state     succeeded" in status.stdout
    assert job_id in convoy(stack, "jobs", "--state", "succeeded").stdout
    fetched = convoy(stack, "fetch", job_id, "--checkpoint", "last", "--out", str(tmp_path))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "epoch-0002.safetensors").stat().st_size > 0
    assert convoy(stack, "logs", job_id).returncode == 0
    # a finished job cannot be canceled: a clear error and a non-zero exit
    refused = convoy(stack, "cancel", job_id)
    assert refused.returncode == 2 and "409" in refused.stderr


def test_a_diverging_job_fails_the_command(stack, tmp_path):
    spec = tmp_path / "nan.json"
    # Stacked linear layers with no non-linearity multiply their weights' growth: with the
    # largest allowed learning rate the loss overflows to inf/NaN within an epoch or two.
    deep_linear = {"input_shape": [1, 8, 8], "num_classes": 10, "layers": [
        {"type": "flatten"}, *[{"type": "linear", "out_features": 64}] * 4,
        {"type": "linear", "out_features": 10}]}
    spec.write_text(json.dumps(train_request(3, model=deep_linear, lr=10.0, momentum=0.9)))
    done = convoy(stack, "submit", str(spec), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"job [0-9a-f]{32} failed: .+", last), last


def test_an_invalid_spec_is_refused_with_the_layer_named(stack, tmp_path):
    bad = train_request(1, model=digits_cnn())
    bad["model"]["layers"][0]["kernel_size"] = 99
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(bad))
    done = convoy(stack, "submit", str(spec))
    assert done.returncode == 2
    assert "422" in done.stderr and "layers" in done.stderr
    missing = convoy(stack, "status", "0" * 32)
    assert missing.returncode == 2 and "404" in missing.stderr


def test_every_example_is_accepted(stack, client):
    for path in sorted(EXAMPLES.glob("*.json")):
        body = json.loads(path.read_text())
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 201, f"{path.name}: {r.text}"
        # accepted is what this checks; the worker need not spend time on them
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    names = {p.name for p in EXAMPLES.glob("*.json")}
    assert {"digits-cnn.json", "lenet5-digits.json", "vgg-small-synthetic.json",
            "feature-maps.json", "invariance.json"} <= names


def test_feature_maps_command_writes_arrays_and_pngs(stack, tmp_path):
    out = tmp_path / "maps"
    done = convoy(stack, "submit", str(EXAMPLES / "feature-maps.json"), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"job ([0-9a-f]{32}) succeeded", done.stdout).group(1)
    got = convoy(stack, "feature-maps", job_id, "--out", str(out))
    assert got.returncode == 0, got.stderr
    layers = json.loads((out / "layers.json").read_text())
    assert layers and all((out / f"{layer['name']}.npy").stat().st_size > 0 for layer in layers)
    pngs = sorted(Path(out).glob("*.png"))
    spatial = [layer for layer in layers if len(layer["shape"]) == 4]
    assert len(spatial) == 3  # conv2d, relu, maxpool2d
    assert len(pngs) == 3 * len(spatial)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_invariance_command_prints_a_row_per_layer_and_a_column_per_magnitude(stack):
    done = convoy(stack, "submit", str(EXAMPLES / "invariance.json"), "--wait")
    job_id = submitted_id(done)
    got = convoy(stack, "invariance", job_id)
    assert got.returncode == 0, got.stderr
    head, *rows = got.stdout.strip().splitlines()
    assert head.split() == ["distance", "per", "layer", "trans", "1", "trans", "2", "trans",
                            "3", "rotat", "15", "rotat", "30", "scale", "0.8", "scale", "1.25"]
    names = ["0-conv2d", "1-relu", "2-maxpool2d", "3-flatten", "4-linear", "output agree",
             "output p(true)"]
    assert [r[:len(n)] for r, n in zip(rows, names, strict=True)] == names
    with stack.client() as client:
        curves = client.get(f"/v1/jobs/{job_id}/invariance").json()
    conv = rows[0].split()[1:]
    assert conv == [f"{p['distance']:.3f}" for family in ("translate", "rotate", "scale")
                    for p in curves["layers"][0]["curves"][family]]
    cosine = convoy(stack, "invariance", job_id, "--measure", "cosine")
    assert cosine.stdout.split()[:3] == ["cosine", "per", "layer"]
    refused = convoy(stack, "invariance", "0" * 32)
    assert refused.returncode == 2 and "404" in refused.stderr


def test_token_create_list_revoke(stack):
    made = convoy_admin(stack, "token", "create", "--tenant", "cli-team", "--name", "cli test")
    assert made.returncode == 0, made.stderr
    head, secret = made.stdout.strip().splitlines()
    token_id = re.fullmatch(r"id ([0-9a-f]{32}) tenant cli-team", head).group(1)

    # the secret is a Bearer token for that tenant: it sees its own (empty) job list only
    with stack.client(secret) as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 200 and r.json()["items"] == []
    ok = convoy(stack, "jobs", token=secret)
    assert ok.returncode == 0 and ok.stdout.startswith("ID"), ok.stderr

    listed = convoy_admin(stack, "token", "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(token_id)]
    assert re.fullmatch(rf"{token_id}  cli-team +user +active  cli test", row), row

    gone = convoy_admin(stack, "token", "revoke", token_id)
    assert gone.returncode == 0 and gone.stdout.strip() == f"revoked {token_id}", gone.stderr
    with stack.client(secret) as c:
        assert c.get("/v1/jobs").status_code == 401
    refused = convoy(stack, "jobs", token=secret)
    assert refused.returncode == 2 and "401" in refused.stderr
    [row] = [line for line in convoy_admin(stack, "token", "list").stdout.splitlines()
             if line.startswith(token_id)]
    assert " revoked " in row, row


def test_fetch_a_named_checkpoint(stack, client, trained, tmp_path):
    listing = {c["name"]: c for c in client.get(f"/v1/jobs/{trained}/checkpoints").json()}
    assert set(listing) == {"epoch-0001.safetensors", "epoch-0002.safetensors"}
    out = tmp_path / "first.safetensors"
    got = convoy(stack, "fetch", trained, "--checkpoint", "epoch-0001.safetensors",
                 "--out", str(out))
    assert got.returncode == 0, got.stderr
    first = listing["epoch-0001.safetensors"]
    assert got.stdout.strip() == f"wrote {out} ({first['size']} bytes)"
    blob = out.read_bytes()
    # epoch 1's file, not the last one
    assert hashlib.sha256(blob).hexdigest() == first["sha256"]
    assert first["sha256"] != listing["epoch-0002.safetensors"]["sha256"]
    state = load_file(str(out))
    assert state and all(t.numel() > 0 for t in state.values())
    missing = convoy(stack, "fetch", trained, "--checkpoint", "epoch-0009.safetensors",
                     "--out", str(tmp_path / "none.safetensors"))
    assert missing.returncode == 2 and "404" in missing.stderr
    assert not (tmp_path / "none.safetensors").exists()


def test_logs_of_a_succeeded_job_say_where_it_ran_and_how_it_ended(stack, trained):
    got = convoy(stack, "logs", trained)
    assert got.returncode == 0, got.stderr
    lines = got.stdout.strip().splitlines()
    # the normal path writes exactly these two lines: one when the attempt starts, one at
    # its outcome
    assert len(lines) == 2, got.stdout
    assert re.fullmatch(r"\S+  info    attempt 1 started on worker w0, device cpu", lines[0]), \
        lines[0]
    assert re.fullmatch(r"\S+  info    succeeded: 2 epochs in [\d.]+ s, val_accuracy 0\.\d{4}",
                        lines[1]), lines[1]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_runs_to_succeeded(stack, name):
    """Each example, submitted as it is with `convoy submit FILE --wait`, succeeds, and its
    log has the attempt's start and success lines. Every example runs with the epochs its
    file gives: the examples are kept small enough for that."""
    path = EXAMPLES / name
    body = json.loads(path.read_text())
    done = convoy(stack, "submit", str(path), "--wait")
    job_id = submitted_id(done)
    logs = convoy(stack, "logs", job_id).stdout
    assert "attempt 1 started on worker w0" in logs and " succeeded: " in logs, logs
    if body["kind"] == "train":
        last = done.stdout.strip().splitlines()[-1]
        assert last.endswith(f", {body['train']['epochs']} epochs"), last


def test_status_prints_why_a_queued_job_waits(stack) -> None:
    """`convoy status` of a cuda job on the CPU test fleet (no worker reads the GPU queue)
    prints its waiting_reason, as the API gives it."""
    with stack.client() as c:
        job = c.post("/v1/jobs", json={**train_request(1), "device": "cuda"}).json()
        try:
            reason = c.get(f"/v1/jobs/{job['id']}").json()["waiting_reason"]
            assert reason and "cuda" in reason
            done = convoy(stack, "status", job["id"])
            assert done.returncode == 0, done.stderr
            assert f"waiting   {reason}" in done.stdout
        finally:
            c.post(f"/v1/jobs/{job['id']}/cancel")
