"""Checkpoints as safetensors, never pickles: the model file holds exactly the module's
state_dict (`layers.{i}.weight`...), the optimizer file its tensors; JSON metadata rides
in the safetensors header."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

META_KEY = "convoy"


@dataclass
class Snapshot:
    """A model's and its optimizer's state at the end of an epoch, copied (clones on the
    same device), so the next epoch's steps cannot change it: serialised later, off the
    training thread, by snapshot_bytes."""

    model: dict[str, torch.Tensor]
    optim_tensors: dict[str, torch.Tensor]
    optim_meta: dict[str, Any]


def _optimizer_parts(optimizer: torch.optim.Optimizer, take: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, values in sd["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = take(value.detach())
            else:
                scalars.setdefault(str(idx), {})[name] = value
    # state_dict() packs param_groups into new dicts: later lr changes do not reach them
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, *, copy: bool = True
             ) -> Snapshot:
    """The state now; `copy=False` only when nothing will step the model or the optimizer
    before the snapshot is serialised (the job's last epoch)."""
    take: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.clone if copy else _same
    state = {k: take(v.detach()) for k, v in model.state_dict().items()}
    return Snapshot(state, *_optimizer_parts(optimizer, take))


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


def snapshot_bytes(snap: Snapshot, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """The model file (its state_dict, `meta` in the header) and the optimizer file."""
    return (save(_cpu(snap.model), metadata={META_KEY: json.dumps(meta)}),
            save(_cpu(snap.optim_tensors), metadata={META_KEY: json.dumps(snap.optim_meta)}))


def model_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={META_KEY: json.dumps(meta)})


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    tensors, meta = _optimizer_parts(optimizer, lambda t: t.to("cpu").contiguous())
    return save(tensors, metadata={META_KEY: json.dumps(meta)})


def read_meta(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a safetensors blob (header only)."""
    if len(data) < 8:
        raise ValueError("file too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 100 * 1024 * 1024:
        raise ValueError("not a safetensors file (bad header length)")
    header = json.loads(data[8:8 + header_len])
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def load_model_state(data: bytes) -> dict[str, torch.Tensor]:
    return load(data)


def optimizer_state(data: bytes, device: torch.device) -> dict[str, Any]:
    """The optimizer state_dict an optimizer file holds (parsed, not applied)."""
    tensors = load(data)
    meta = read_meta(data)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value.to(device)
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, data: bytes, device: torch.device) -> None:
    optimizer.load_state_dict(optimizer_state(data, device))


def check_model_state(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """ValueError unless `state` has exactly the model's tensor names and shapes, so that
    loading it cannot fail half-way."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    if missing or extra or wrong:
        raise ValueError(f"tensors do not fit the model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, wrong shape {wrong[:3]})")
