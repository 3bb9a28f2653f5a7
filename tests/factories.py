"""Factories for what tests send: specs, job requests, upload bodies and their files.

    client.post("/v1/jobs", json=train_request(1, model=digits_cnn(4)))
    client.post("/v1/datasets", **dataset_upload(dataset_npz(40)))
    client.post("/v1/checkpoints", **checkpoint_upload(safetensors_for(spec), spec))
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from models.presets import digits_cnn

__all__ = [
    "checkpoint_upload", "dataset_npz", "dataset_upload", "digits_cnn", "feature_maps_request",
    "inputs_upload", "npy_bytes", "npz_bytes", "safetensors_for", "train_request",
]


# -- job requests ------------------------------------------------------------------------------

def train_request(epochs: int = 3, *, model: dict[str, Any] | None = None,
                  dataset: dict[str, Any] | None = None, device: str = "cpu",
                  **train: Any) -> dict[str, Any]:
    """A train job: digits_cnn() on the built-in digits unless told otherwise; `train`
    overrides the training settings (batch_size=32, seed=1...)."""
    return {
        "kind": "train",
        "name": "digits-cnn",
        "model": model or digits_cnn(),
        "dataset": dataset or {"name": "digits"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "seed": 0, **train},
        "device": device,
    }


def feature_maps_request(source: dict[str, Any], *, inputs: dict[str, Any] | None = None,
                         device: str = "cpu", **fields: Any) -> dict[str, Any]:
    """A feature-map job of `source` ({"job_id": ...}, {"checkpoint_id": ...} or {"model":
    spec, "seed": 0}) on `inputs` (default: the first two digits); `fields` adds the rest
    (layers, pool, png...)."""
    return {"kind": "feature_maps", "source": source,
            "inputs": inputs if inputs is not None else {"dataset": "digits", "indices": [0, 1]},
            "device": device, **fields}


# -- files -------------------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz_bytes(*, compressed: bool = False, **arrays: np.ndarray) -> bytes:
    """An .npz of the named arrays (x=..., y=...), as np.savez (or savez_compressed) writes."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def dataset_npz(n: int = 40, shape: tuple[int, ...] = (1, 8, 8), *, classes: int = 10,
                seed: int = 0, compressed: bool = False) -> bytes:
    """An uploadable dataset: n random float32 images in [0, 1), labels 0, 1, ... classes-1,
    0, 1..."""
    x = np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
    return npz_bytes(x=x, y=np.arange(n) % classes, compressed=compressed)


def safetensors_for(spec: dict[str, Any], *, seed: int = 0) -> bytes:
    """The safetensors checkpoint of `spec`'s freshly built model (torch seeded with `seed`)."""
    import torch
    from safetensors.torch import save

    from models.build import build_model
    from models.spec import ModelSpec

    torch.manual_seed(seed)
    model = build_model(ModelSpec.model_validate(spec))
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


# -- uploads: keyword arguments for client.post(route, **...) -----------------------------------

def dataset_upload(blob: bytes, *, filename: str = "data.npz", name: str | None = None
                   ) -> dict[str, Any]:
    """For POST /v1/datasets."""
    return {"files": {"file": (filename, blob)},
            **({"data": {"name": name}} if name is not None else {})}


def checkpoint_upload(blob: bytes, model: dict[str, Any], *,
                      filename: str = "ckpt.safetensors") -> dict[str, Any]:
    """For POST /v1/checkpoints: the file and the spec it is a checkpoint of."""
    return {"files": {"file": (filename, blob)}, "data": {"model": json.dumps(model)}}


def inputs_upload(blob: bytes, *, filename: str = "x.npy") -> dict[str, Any]:
    """For POST /v1/inputs (an .npy batch, or a PNG / JPEG picture)."""
    return {"files": {"file": (filename, blob)}}
