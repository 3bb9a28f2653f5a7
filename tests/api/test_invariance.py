"""Invariance jobs end to end through the real API, Redis, a Celery worker and PostgreSQL: the
measures against the documented definitions computed with numpy, the submission checks, and
the trained digits CNN and LeNet-5 through bench/invariance_report.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from bench.invariance_report import measure_models
from client.sdk import Convoy
from tests.factories import checkpoint_upload, digits_cnn, inputs_upload, npy_bytes, train_request
from tests.services import TOKEN, wait_job

# a 1x1 convolution with weight 1 and bias 0 (its maps are the input), a global average
IDENTITY_THEN_MEAN = {"input_shape": [1, 4, 4], "layers": [
    {"type": "conv2d", "out_channels": 1, "kernel_size": 1},
    {"type": "adaptive_avgpool2d", "output_size": 1},
    {"type": "flatten"}]}


def shifted(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """x [H, W] moved dx right and dy down, zero fill: the documented definition."""
    h, w = x.shape
    out = np.zeros_like(x)
    for i, j in itertools.product(range(h), range(w)):
        if 0 <= i - dy < h and 0 <= j - dx < w:
            out[i, j] = x[i - dy, j - dx]
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a.ravel() @ b.ravel() / (na * nb))


def by_hand(xs: list[np.ndarray], phi, k: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """cosine and distance of layer phi for a translation by k, from the definitions."""
    moved = [[phi(shifted(x, dx * k, dy * k)) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
             for x in xs]
    cos = np.mean([cosine(phi(x), m) for x, ms in zip(xs, moved, strict=True) for m in ms])
    dist = np.mean([np.linalg.norm(phi(x) - m) for x, ms in zip(xs, moved, strict=True)
                    for m in ms])
    between = np.mean([np.linalg.norm(phi(a) - phi(b)) for a, b in itertools.combinations(xs, 2)])
    return float(cos), float(dist / between)


def curve(layer: dict, family: str) -> dict:  # type: ignore[type-arg]
    return {p["magnitude"]: p for p in layer["curves"][family]}


def test_measures_equal_the_definitions_computed_by_hand(client):
    r = client.post("/v1/checkpoints", **checkpoint_upload(save_safetensors({
        "layers.0.weight": np.ones((1, 1, 1, 1), np.float32),
        "layers.0.bias": np.zeros(1, np.float32)}), IDENTITY_THEN_MEAN))
    assert r.status_code == 201, r.text
    rng = np.random.default_rng(3)
    # centred and symmetric: each input equals itself turned by 180 degrees
    xs = [(v + v[::-1, ::-1]).astype(np.float32) for v in rng.random((3, 4, 4))]
    xs[2][1:3, 1:3] = 0.0  # a hole in the middle: a zero pixel moves in under translation
    up = client.post("/v1/inputs", **inputs_upload(npy_bytes(np.stack(xs)[:, None])))
    assert up.status_code == 201, up.text
    r = client.post("/v1/jobs", json={
        "kind": "invariance", "source": {"checkpoint_id": r.json()["id"]},
        "inputs": {"input_id": up.json()["id"]}, "layers": None, "device": "cpu",
        "transforms": {"translate": [1, 3], "rotate": [180], "scale": [1.0]}})
    assert r.status_code == 201, r.text
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    got = client.get(f"/v1/jobs/{done['id']}/invariance").json()
    assert [(la["name"], la["index"], la["type"]) for la in got["layers"]] == [
        ("0-conv2d", 0, "conv2d"), ("1-adaptive_avgpool2d", 1, "adaptive_avgpool2d"),
        ("2-flatten", 2, "flatten")]
    conv, mean, _ = got["layers"]
    for k in (1, 3):
        for layer, phi in ((conv, lambda x: x), (mean, lambda x: np.array([x.mean()]))):
            cos, dist = by_hand(xs, phi, k)
            point = curve(layer, "translate")[k]
            assert point["cosine"] == pytest.approx(cos, rel=1e-5), (layer["name"], k)
            assert point["distance"] == pytest.approx(dist, rel=1e-5), (layer["name"], k)
    # a 180-degree turn of a centred symmetric input changes no layer; a scaling by 1 neither
    for layer in got["layers"]:
        for family, magnitude in (("rotate", 180), ("scale", 1.0)):
            point = curve(layer, family)[magnitude]
            assert point["distance"] == pytest.approx(0, abs=1e-6), (layer["name"], family)
            assert point["cosine"] == pytest.approx(1, abs=1e-6), (layer["name"], family)
    # the output is one number: its argmax never changes; uploaded inputs carry no labels
    assert got["output"]["translate"] == [
        {"magnitude": k, "agreement": 1.0, "true_class_probability": None} for k in (1, 3)]
    assert done["result"]["images_through_model"] == 3 * (1 + 4 * 2 + 2 + 1)


def test_maps_that_are_not_finite_fail_the_job_naming_the_layer(client):
    """A checkpoint whose weights are NaN (uploads accept it) made every map NaN; the job
    succeeded with cosine 0 and distance null, numbers that mean something else."""
    r = client.post("/v1/checkpoints", **checkpoint_upload(save_safetensors({
        "layers.0.weight": np.full((1, 1, 1, 1), np.nan, np.float32),
        "layers.0.bias": np.zeros(1, np.float32)}), IDENTITY_THEN_MEAN))
    assert r.status_code == 201, r.text
    up = client.post("/v1/inputs", **inputs_upload(npy_bytes(
        np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32))))
    assert up.status_code == 201, up.text
    r = client.post("/v1/jobs", json={
        "kind": "invariance", "source": {"checkpoint_id": r.json()["id"]},
        "inputs": {"input_id": up.json()["id"]}, "device": "cpu", "max_attempts": 1,
        "transforms": {"translate": [1]}})
    assert r.status_code == 201, r.text
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "failed", done
    assert "0-conv2d" in done["error"] and "NaN or infinite" in done["error"], done["error"]


@pytest.mark.parametrize(("transforms", "layers", "loc"), [
    ({"shear": [1]}, None, ["transforms", "shear"]),
    ({"translate": []}, None, ["transforms", "translate"]),
    ({"scale": [-0.5]}, None, ["transforms", "scale", 0]),
    ({"scale": [1.25, 0]}, None, ["transforms", "scale", 1]),
    ({"scale": [0.5, 1e-300]}, None, ["transforms", "scale", 1]),  # was accepted: NaN curves
    ({"translate": [1, 8]}, None, ["transforms", "translate", 1]),
    ({"translate": [1.5]}, None, ["transforms", "translate", 0]),
    ({"rotate": list(range(1, 34))}, None, ["transforms", "rotate"]),
    ({}, None, ["transforms"]),
    ({"translate": [1]}, ["0-conv2d", "9-conv2d"], ["layers", 1]),
    ({"translate": [1]}, [], ["layers"]),
])
def test_bad_transforms_and_layers_are_422_naming_the_field(client, transforms, layers, loc):
    r = client.post("/v1/jobs", json={
        "kind": "invariance", "source": {"model": digits_cnn(), "seed": 0},
        "inputs": {"dataset": "digits", "indices": [0, 1]}, "layers": layers,
        "transforms": transforms})
    assert r.status_code == 422, r.text
    where = [[p for p in issue["loc"] if p not in ("body", "invariance")]
             for issue in r.json()["detail"]]
    assert loc in where, r.json()


def test_curves_of_another_kind_of_job_are_not_found(client):
    r = client.post("/v1/jobs", json=train_request(1))
    assert r.status_code == 201, r.text
    got = client.get(f"/v1/jobs/{r.json()['id']}/invariance")
    assert got.status_code == 404 and "train job" in got.json()["detail"]
    wait_job(client, r.json()["id"])


def test_trained_digits_cnn_and_lenet5_through_the_report_script(stack):
    with Convoy(stack.url, TOKEN) as convoy:
        report = measure_models(convoy, inputs=100)
    assert [m["name"] for m in report] == ["digits-cnn", "lenet5-digits"]
    for model in report:
        assert model["original"]["accuracy"] > 0.8, model  # trained, not random weights
        layers = model["layers"]
        assert layers[0]["name"] == "0-conv2d"
        for layer in layers:
            points = curve(layer, "translate")
            assert sorted(points) == [1, 2, 3]
            assert all(0 <= p["distance"] < 3 and -1 <= p["cosine"] <= 1
                       for p in points.values()), layer
        # a convolution is equivariant: 2 pixels away, its maps differ more than 1 away
        first = curve(layers[0], "translate")
        assert first[2]["distance"] > first[1]["distance"]
        out = {p["magnitude"]: p for p in model["output"]["translate"]}
        assert out[1]["agreement"] >= out[2]["agreement"]


def test_cancel_stops_a_running_invariance_job_between_chunks(client):
    wide = {"input_shape": [1, 8, 8], "num_classes": 10, "layers": [
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    # 1797 digits x 125 passes of 9.6 MFLOP each (2.2 TFLOP): minutes on one CPU thread
    r = client.post("/v1/jobs", json={
        "kind": "invariance", "source": {"model": wide, "seed": 0}, "device": "cpu",
        "inputs": {"dataset": "digits", "indices": list(range(1797))},
        "transforms": {"translate": list(range(1, 8)), "rotate": list(range(1, 33)),
                       "scale": [0.5 + k / 16 for k in range(32)]}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["summary"]["invariance"]["forward_passes"] == 1 + 4 * 7 + 2 * 32 + 32
    wait_job(client, job_id, states=("running",))
    # running, with progress: its curves are not there yet
    got = client.get(f"/v1/jobs/{job_id}/invariance").json()
    assert got["state"] == "running" and got["layers"] == [] and got["output"] is None
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    done = wait_job(client, job_id, timeout=60)
    assert done["state"] == "canceled" and done["result"] is None and done["progress"] < 1
    # the worker let it go: the next job runs at once rather than after the whole measurement
    r = client.post("/v1/jobs", json={
        "kind": "invariance", "source": {"model": wide, "seed": 0}, "device": "cpu",
        "inputs": {"dataset": "digits", "indices": [0, 1]}, "transforms": {"translate": [1]}})
    assert wait_job(client, r.json()["id"], timeout=60)["state"] == "succeeded"
