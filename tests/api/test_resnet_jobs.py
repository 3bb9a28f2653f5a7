"""resnet-small with augmentation on the CIFAR-sized synthetic task, end to end through the
API, Redis, a Celery worker and PostgreSQL; and the checks of `train.augment`."""

from __future__ import annotations

import torch

from models.build import build_model
from models.spec import ModelSpec
from tests.factories import train_request
from tests.services import wait_job

SCENES = {"name": "synthetic", "task": "scenes", "samples": 160}
AUGMENT = {"random_crop": {"padding": 4}, "hflip": True, "translate": 2}


def test_resnet_small_trains_on_scenes_with_augmentation(client):
    request = train_request(1, model={"preset": "resnet-small"}, dataset=SCENES,
                            batch_size=32, augment=AUGMENT)
    r = client.post("/v1/jobs", json=request)
    assert r.status_code == 201, r.text
    job = r.json()
    summary = job["summary"]
    torch_params = sum(p.numel() for p in build_model(
        ModelSpec.model_validate({"preset": "resnet-small"})).parameters())
    assert summary["total_params"] == torch_params
    block = summary["layers"][7]
    assert block["type"] == "residual" and block["shortcut"]["type"] == "projection"
    assert [row["type"] for row in block["layers"]] == [
        "conv2d", "batchnorm2d", "relu", "conv2d", "batchnorm2d"]
    assert job["request"]["train"]["augment"]["random_crop"] == {"padding": 4}
    done = wait_job(client, job["id"], timeout=240)
    assert done["state"] == "succeeded", done["error"]
    assert 0.0 <= done["result"]["val_accuracy"] <= 1.0
    state = client.get(f"/v1/jobs/{job['id']}/checkpoints/last")
    assert state.status_code == 200
    # the checkpoint loads into the module the spec builds, inner layers and shortcuts too
    from safetensors.torch import load

    model = build_model(ModelSpec.model_validate({"preset": "resnet-small"}))
    model.load_state_dict(load(state.content))
    assert torch.isfinite(model.eval()(torch.zeros(1, 3, 32, 32))).all()


def test_augmentation_larger_than_the_input_is_refused_naming_the_field(client):
    cases = [({"random_crop": {"padding": 8}}, ["body", "train", "augment", "random_crop",
                                                 "padding"]),
             ({"translate": 9}, ["body", "train", "augment", "translate"])]
    for augment, loc in cases:
        r = client.post("/v1/jobs", json=train_request(1, augment=augment))
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == loc
        assert "smaller side 8" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/jobs", json=train_request(1, augment={"rotate": 10}))
    assert r.status_code == 422
    r = client.post("/v1/jobs", json=train_request(1, augment={"translate": 7, "hflip": True}))
    assert r.status_code == 201, r.text


def test_a_block_error_names_the_inner_layer(client):
    model = {"input_shape": [1, 8, 8], "num_classes": 10, "layers": [
        {"type": "residual", "layers": [
            {"type": "conv2d", "out_channels": 1, "kernel_size": 3, "padding": 1},
            {"type": "conv2d", "out_channels": 1, "kernel_size": 12}]},
        {"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    r = client.post("/v1/models/summary", json=model)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "layers", 0, "layers", 1]
    assert "layer 0 (residual) layer 1 (conv2d)" in r.json()["detail"][0]["msg"]


def test_feature_maps_of_layers_inside_a_block(client):
    request = {"kind": "feature_maps", "source": {"model": {"preset": "resnet-small"}},
               "inputs": {"dataset": SCENES, "indices": [0, 1]},
               "layers": ["3-residual/0-conv2d", "7-residual/4-batchnorm2d", "7"], "png": False}
    r = client.post("/v1/jobs", json=request)
    assert r.status_code == 201, r.text
    plan = r.json()["summary"]["feature_maps"]
    assert plan["layers"] == ["3-residual/0-conv2d", "7-residual/4-batchnorm2d", "7-residual"]
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    listing = client.get(f"/v1/jobs/{done['id']}/feature-maps").json()["layers"]
    assert [(m["name"], m["shape"]) for m in listing] == [
        ("3-residual/0-conv2d", [2, 16, 32, 32]), ("7-residual/4-batchnorm2d", [2, 32, 16, 16]),
        ("7-residual", [2, 32, 16, 16])]
    r = client.get(f"/v1/jobs/{done['id']}/feature-maps/7-residual/4-batchnorm2d",
                   params={"format": "npy"})
    assert r.status_code == 200, r.text
    bad = client.post("/v1/jobs", json={**request, "layers": ["3-residual/9-conv2d"]})
    assert bad.status_code == 422
    assert "3-residual/0-conv2d" in bad.json()["detail"][0]["msg"]
