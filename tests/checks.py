"""Checks that tests make on what the service returns, computed without the worker's code."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load

from convoy.datasets import load_digits
from models.build import build_model
from models.spec import ModelSpec


def digits_val_accuracy(blob: bytes, model_spec: dict[str, Any]) -> float:
    """A downloaded checkpoint loaded strictly into the spec's architecture, scored on the
    digits validation split by a plain argmax count: not worker.train.evaluate, so a bug
    there (the wrong split, train mode, a miscount) cannot agree with itself."""
    model = build_model(ModelSpec.model_validate(model_spec))
    model.load_state_dict(load(blob))  # strict: exactly the architecture's tensors
    model.eval()
    split = load_digits()
    assert len(split.x_val) + len(split.x_train) == 1797 and len(split.x_val) > 300
    with torch.inference_mode():
        predicted = model(torch.from_numpy(split.x_val)).argmax(1).numpy()
    return int((predicted == split.y_val).sum()) / len(split.y_val)
