"""Where a job runs and on what: the device it asked for, and its dataset split (generated
datasets kept between jobs, up to settings.dataset_cache_bytes)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
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
        return GENERATED.load(ref, max_bytes=settings.dataset_cache_bytes)
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


def _arrays(split: datasets.Split) -> tuple[np.ndarray, ...]:
    return split.x_train, split.y_train, split.x_val, split.y_val


class GeneratedCache:
    """Generated datasets kept between jobs, by their full reference (every field, defaults
    included), least recently used dropped past `max_bytes`. The kept arrays are read-only
    and each caller gets copies, so no job can change another's data."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, datasets.Split] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, ref: datasets.SyntheticRef, *, max_bytes: int) -> datasets.Split:
        key = ref.model_dump_json()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
        if kept is None:
            split = datasets.load_synthetic(ref)
            if sum(a.nbytes for a in _arrays(split)) > max_bytes:
                return split  # too large to keep: the caller has the only copy
            for a in _arrays(split):
                a.flags.writeable = False
            with self._lock:
                self._kept[key] = kept = split
                self._evict(max_bytes)
        return datasets.Split(*(a.copy() for a in _arrays(kept)))

    def _evict(self, max_bytes: int) -> None:
        total = sum(a.nbytes for split in self._kept.values() for a in _arrays(split))
        while total > max_bytes and self._kept:
            _, dropped = self._kept.popitem(last=False)
            total -= sum(a.nbytes for a in _arrays(dropped))

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def kept(self) -> list[str]:
        with self._lock:
            return list(self._kept)


GENERATED = GeneratedCache()
