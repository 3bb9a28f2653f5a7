"""Where a job runs and on what: the device it asked for, and its dataset split."""

from __future__ import annotations

import torch

from convoy import datasets
from convoy.artifacts import get_store
from convoy.settings import Settings
from db import uploads
from db.session import session_scope


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this worker has no CUDA device")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def load_split(ref: datasets.DigitsRef | datasets.SyntheticRef | datasets.UploadRef, *,
               settings: Settings, tenant: str) -> datasets.Split:
    if isinstance(ref, datasets.DigitsRef):
        return datasets.load_digits()
    if isinstance(ref, datasets.SyntheticRef):
        return datasets.load_synthetic(ref)
    with session_scope(settings.database_url) as session:
        upload = uploads.get(session, id=ref.id, tenant=tenant, kind="dataset")
        if upload is None:
            raise LookupError(f"dataset {ref.id} not found")
        key, presplit = upload.key, bool((upload.meta or {}).get("split"))
    data = get_store(settings).get_bytes(key)
    if presplit:  # an image folder with its own val/ split
        return datasets.parse_presplit(data, max_pixels=settings.max_image_pixels)
    x, y = datasets.parse_npz(data, max_pixels=settings.max_image_pixels)
    return datasets.split_uploaded(x, y)
