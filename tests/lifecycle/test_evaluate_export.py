"""Evaluate and export jobs through the real stack. Evaluate: accuracy recomputed here from
the downloaded checkpoint on the digits validation split equals the job's (and the train
job's last val_accuracy); the paginated predictions agree with that recount input by input.
Export: onnxruntime's output on the digits validation set matches PyTorch's (the downloaded
checkpoint) to 1e-4 for the digits CNN, LeNet-5 and vgg-small, at two batch sizes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from convoy.datasets import load_digits
from models.build import build_model
from models.spec import ModelSpec
from tests.factories import digits_cnn, inputs_upload, train_request
from tests.services import ROOT, TOKEN, Stack, run_ok

VGG_SMALL = {"preset": "vgg-small", "input_shape": [1, 8, 8], "num_classes": 10}
LENET5 = {"preset": "lenet5-padded", "input_shape": [1, 8, 8], "num_classes": 10}


def train(client: httpx.Client, model: dict[str, Any], epochs: int = 2) -> dict[str, Any]:
    return run_ok(client, train_request(epochs, model=model), timeout=180)


def torch_model(client: httpx.Client, job: dict[str, Any]) -> torch.nn.Module:
    """The train job's last checkpoint, loaded here (not by the service)."""
    blob = client.get(f"/v1/jobs/{job['id']}/checkpoints/last")
    assert blob.status_code == 200
    spec = ModelSpec.model_validate(job["request"]["model"])
    model = build_model(spec)
    model.load_state_dict(load(blob.content))
    return model.eval()


@pytest.fixture(scope="module")
def digits_job(stack: Stack) -> dict[str, Any]:
    with stack.client() as client:
        return train(client, digits_cnn(), epochs=3)


def test_evaluate_accuracy_equals_an_independent_recount(client: httpx.Client,
                                                         digits_job: dict[str, Any]) -> None:
    done = run_ok(client, {"kind": "evaluate", "source": {"job_id": digits_job["id"]},
                        "inputs": {"dataset": "digits", "split": "val"}, "top_k": 3,
                        "device": "cpu"})
    result = done["result"]
    split = load_digits()
    with torch.no_grad():
        logits = torch_model(client, digits_job)(torch.from_numpy(split.x_val))
    pred = logits.argmax(1).numpy()
    recount = float((pred == split.y_val).mean())
    assert result["inputs"] == len(split.y_val) == 359
    assert result["accuracy"] == pytest.approx(recount, abs=1e-12)
    assert result["accuracy"] == pytest.approx(digits_job["result"]["val_accuracy"], abs=1e-12)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(split.y_val)).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 359 and np.trace(confusion) == int((pred == split.y_val).sum())
    for c, row in enumerate(result["per_class"]):
        assert row["support"] == int((split.y_val == c).sum())
        if row["recall"] is not None:
            assert row["recall"] == pytest.approx(
                float((pred[split.y_val == c] == c).mean()), abs=1e-12)

    # every prediction, page by page, agrees with the recount
    items: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(f"/v1/jobs/{done['id']}/predictions",
                          params={"offset": offset, "limit": 100}).json()
        assert page["total"] == 359
        items += page["items"]
        offset = page["next_offset"]
    assert [p["index"] for p in items] == list(range(359))
    assert [p["label"] for p in items] == split.y_val.tolist()
    assert [p["top"][0]["class"] for p in items] == pred.tolist()
    probs = torch.softmax(logits, 1).numpy()
    for p in items[:50]:
        assert len(p["top"]) == 3
        got = [t["probability"] for t in p["top"]]
        assert got == sorted(got, reverse=True)
        assert got[0] == pytest.approx(float(probs[p["index"]].max()), abs=1e-5)


def test_evaluate_an_uploaded_image_has_no_labels(client: httpx.Client,
                                                  digits_job: dict[str, Any]) -> None:
    image = (load_digits().x_val[0, 0] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    up = client.post("/v1/inputs", **inputs_upload(buf.getvalue(), filename="d.png")).json()
    done = run_ok(client, {"kind": "evaluate", "source": {"job_id": digits_job["id"]},
                        "inputs": {"input_id": up["id"]}, "device": "cpu"})
    assert done["result"]["labelled"] is False and "accuracy" not in done["result"]
    page = client.get(f"/v1/jobs/{done['id']}/predictions").json()
    assert page["total"] == 1 and page["items"][0]["label"] is None
    assert len(page["items"][0]["top"]) == 5


def test_evaluate_bad_requests_name_the_field(client: httpx.Client,
                                              digits_job: dict[str, Any]) -> None:
    no_classes = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel_size": 3}]}
    r = client.post("/v1/jobs", json={"kind": "evaluate", "device": "cpu",
                                      "source": {"model": no_classes},
                                      "inputs": {"dataset": "digits"}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "source", "model"]
    assert "not a vector of class scores" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/jobs", json={"kind": "evaluate", "source": {"job_id": "ab" * 16},
                                      "inputs": {"dataset": "digits"}})
    assert r.status_code == 404 and "source.job_id" in r.text, r.text
    r = client.post("/v1/jobs", json={"kind": "evaluate", "top_k": 0,
                                      "source": {"job_id": digits_job["id"]},
                                      "inputs": {"dataset": "digits"}})
    assert r.status_code == 422 and "top_k" in r.text
    r = client.get(f"/v1/jobs/{digits_job['id']}/predictions")
    assert r.status_code == 404


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_digits_cnn(client: httpx.Client, digits_job: dict[str, Any], fmt: str) -> None:
    check_export(client, digits_job, fmt)


@pytest.mark.parametrize("model", [LENET5, VGG_SMALL], ids=["lenet5", "vgg-small"])
def test_export_lenet5_and_vgg_small(client: httpx.Client, model: dict[str, Any]) -> None:
    check_export(client, train(client, model, epochs=1), "onnx")


def check_export(client: httpx.Client, job: dict[str, Any], fmt: str) -> None:
    done = run_ok(client, {"kind": "export", "source": {"job_id": job["id"]}, "format": fmt})
    assert done["result"]["format"] == fmt
    assert done["result"]["max_abs_diff"] < 1e-4
    r = client.get(f"/v1/jobs/{done['id']}/export")
    assert r.status_code == 200 and r.headers["x-sha256"] == done["result"]["sha256"]
    x = load_digits().x_val
    with torch.no_grad():
        want = torch_model(client, job)(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
        outs = [session.run(None, {"input": x[:n]})[0] for n in (len(x), 7)]
    else:
        loaded = torch.jit.load(io.BytesIO(r.content))
        with torch.no_grad():
            outs = [loaded(torch.from_numpy(x[:n])).numpy() for n in (len(x), 7)]
    for got in outs:  # the whole split, and a batch of 7: the batch dimension is dynamic
        assert np.abs(got - want[:len(got)]).max() < 1e-4


def test_cli_predict_prints_the_top_classes(stack: Stack, client: httpx.Client,
                                            digits_job: dict[str, Any], tmp_path: Path) -> None:
    split = load_digits()
    k = int(np.flatnonzero(split.y_val == 7)[0])
    path = tmp_path / "seven.png"
    Image.fromarray((split.x_val[k, 0] * 255).round().astype(np.uint8)).save(path)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "predict", "--model", digits_job["id"], str(path),
         "--top", "2", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "CONVOY_URL": stack.url, "CONVOY_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    # the model's own answer for that image, computed here from its checkpoint
    x = np.asarray(Image.open(path), dtype=np.float32)[None, None] / 255
    with torch.no_grad():
        probs = torch.softmax(torch_model(client, digits_job)(torch.from_numpy(x)), 1)[0]
    top = probs.topk(2)
    assert line == (f"{path}[0]: {top.indices[0].item()} ({top.values[0].item():.3f}), "
                    f"{top.indices[1].item()} ({top.values[1].item():.3f})")
