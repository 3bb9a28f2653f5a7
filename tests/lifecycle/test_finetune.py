"""Fine-tune and continue through the real stack: continuing a 2-epoch job for 2 more epochs
gives the same weights as one 4-epoch job with the same seed (to 1e-5), its epochs numbered
3 and 4; an `init` whose shapes differ is a 422 naming the layer, and `strict: false` loads
the layers that match and names the others."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load

from tests.factories import digits_cnn, train_request
from tests.services import run_ok


def last_weights(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    r = client.get(f"/v1/jobs/{job_id}/checkpoints/last")
    assert r.status_code == 200
    return load(r.content)


def test_continue_equals_one_longer_run(client: httpx.Client) -> None:
    first = run_ok(client, train_request(2, seed=3))
    more = train_request(2, seed=3)
    more["init"] = {"job_id": first["id"]}
    more["continue"] = True
    continued = run_ok(client, more)
    whole = run_ok(client, train_request(4, seed=3))
    assert continued["summary"]["init"]["epoch"] == 2
    names = [c["name"] for c in client.get(f"/v1/jobs/{continued['id']}/checkpoints").json()]
    assert names == ["epoch-0003.safetensors", "epoch-0004.safetensors"]
    series = client.get(f"/v1/jobs/{continued['id']}/metrics?name=val_accuracy").json()
    assert [p["epoch"] for p in series["series"]["val_accuracy"]] == [3, 4]
    a, b = last_weights(client, continued["id"]), last_weights(client, whole["id"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    assert continued["result"]["val_accuracy"] == pytest.approx(
        whole["result"]["val_accuracy"], abs=1e-9)
    # without the optimizer state the same two epochs do not give the same model
    warm = train_request(2, seed=3)
    warm["init"] = {"job_id": first["id"]}
    restarted = last_weights(client, run_ok(client, warm)["id"])
    assert not torch.allclose(restarted["layers.0.weight"], b["layers.0.weight"], atol=1e-5)


def test_init_shapes_are_checked_at_submission(client: httpx.Client) -> None:
    source = run_ok(client, train_request(1))
    narrow = train_request(1, model=digits_cnn(8))
    narrow["init"] = {"job_id": source["id"]}
    r = client.post("/v1/jobs", json=narrow)
    assert r.status_code == 422, r.text
    issue = r.json()["detail"][0]
    assert issue["loc"] == ["body", "init"]
    assert "layer 0 (layers.0.weight)" in issue["msg"] and "[16, 1, 3, 3]" in issue["msg"]

    # another head: strict false keeps the convolution and names the layer it could not load
    head = digits_cnn()
    head["layers"][-1]["out_features"] = head["num_classes"] = 12
    body = train_request(1, model=head)
    body["init"] = {"job_id": source["id"]}
    assert client.post("/v1/jobs", json=body).status_code == 422
    body["init"]["strict"] = False
    done = run_ok(client, body)
    assert done["summary"]["init"]["loaded"] == ["layers.0.weight", "layers.0.bias"]
    assert done["summary"]["init"]["skipped"] == ["layers.4.weight", "layers.4.bias"]
    logs = [line["message"] for line in client.get(f"/v1/jobs/{done['id']}/logs").json()]
    assert any("2 tensors loaded, 2 left as seeded" in m for m in logs), logs

    bad = train_request(1)
    bad["continue"] = True
    r = client.post("/v1/jobs", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "continue"]
    bad["init"] = {"job_id": "ab" * 16}
    assert client.post("/v1/jobs", json=bad).status_code == 404
