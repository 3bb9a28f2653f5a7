"""Checks a job request beyond its schema (dataset fit, limits) before a row is written."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy.orm import Session

from convoy import datasets
from convoy.jobspec import TrainConfig, TrainJobRequest
from convoy.settings import Settings, get_settings
from db import uploads
from models.spec import ModelSpec, SpecError, infer, layer_count


def unprocessable(field: str, message: str) -> HTTPException:
    loc = ["body", *(int(p) if p.isdigit() else p for p in field.split(".") if p)]
    return HTTPException(422, [{"loc": loc, "msg": message,
                                "type": "value_error"}])


def summarize_or_422(spec: ModelSpec, *, field: str = "model",
                     settings: Settings | None = None) -> dict[str, Any]:
    """The spec's summary, or a 422 naming the layer. Bounded cost: at most max_model_layers
    layers, no map larger than max_feature_side, and inference is O(layers)."""
    settings = settings or get_settings()
    count = layer_count(spec)
    if count > settings.max_model_layers:
        raise unprocessable(f"{field}.layers", f"{count} layers (those inside residual blocks "
                                               "included) exceed the limit "
                                               f"max_model_layers={settings.max_model_layers}")
    try:
        return infer(spec, max_side=settings.max_feature_side)
    except SpecError as exc:
        loc = f"{field}.layers.{exc.index}" if exc.index is not None else field
        if exc.inner is not None:
            loc += f".layers.{exc.inner}"
        message = str(exc)
        raise unprocessable(loc, message) from exc


def check_model_limits(summary: dict[str, Any], settings: Settings, *, batch_size: int,
                       field: str = "model") -> None:
    c, h, w = summary["input_shape"]
    if h * w > settings.max_image_pixels or max(h, w) > settings.max_input_side:
        raise unprocessable(f"{field}.input_shape",
                            f"input {h}x{w} exceeds the limit max_input_side="
                            f"{settings.max_input_side} / max_image_pixels="
                            f"{settings.max_image_pixels}")
    if summary["total_params"] > settings.max_params:
        raise unprocessable(field, f"{summary['total_params']} parameters exceed the limit "
                                   f"max_params={settings.max_params}")
    # forward activations, kept for backward, and their gradients
    activation = summary["activation_bytes_per_sample"] * batch_size * 2
    if activation > settings.max_activation_bytes:
        raise unprocessable(field, f"estimated activation memory {activation} bytes per batch "
                                   f"exceeds the limit max_activation_bytes="
                                   f"{settings.max_activation_bytes}; use a smaller batch_size "
                                   f"or model")


def dataset_info(session: Session, ref: Any, *, tenant: str) -> datasets.DatasetInfo:
    if isinstance(ref, datasets.UploadRef):
        upload = uploads.get(session, id=ref.id, tenant=tenant, kind="dataset")
        if upload is None:
            raise unprocessable("dataset.id", f"no dataset with id {ref.id}")
        meta = upload.meta
        return datasets.DatasetInfo(tuple(meta["input_shape"]), meta["num_classes"],
                                    meta["samples"])
    return datasets.builtin_info(ref)


def check_train(session: Session, req: TrainJobRequest, settings: Settings, *,
                tenant: str) -> dict[str, Any]:
    """The summary of a valid train request, or a 422 naming the field and the reason."""
    summary = summarize_or_422(req.model, settings=settings)
    cfg = req.train
    if cfg.epochs > settings.max_epochs:
        raise unprocessable("train.epochs", f"{cfg.epochs} exceeds the limit max_epochs="
                                            f"{settings.max_epochs}")
    if cfg.batch_size > settings.max_batch_size:
        raise unprocessable("train.batch_size", f"{cfg.batch_size} exceeds the limit "
                                                f"max_batch_size={settings.max_batch_size}")
    check_model_limits(summary, settings, batch_size=cfg.batch_size)
    check_augment(cfg, summary["input_shape"])
    check_devices(req, settings, summary)
    info = dataset_info(session, req.dataset, tenant=tenant)
    if too_large := datasets.oversized(req.dataset, settings.max_dataset_bytes):
        raise unprocessable("dataset.samples", too_large)
    if list(info.input_shape) != summary["input_shape"]:
        raise unprocessable("model.input_shape",
                            f"{summary['input_shape']} does not match the dataset's images "
                            f"{list(info.input_shape)}")
    out = summary["output_shape"]
    if len(out) != 1 or out[0] < info.num_classes:
        raise unprocessable("model.layers", f"the model outputs {out} but the dataset has "
                                            f"{info.num_classes} classes; end with a linear "
                                            f"layer of {info.num_classes} outputs")
    check_work(summary, info.samples, cfg.epochs, settings, tenant=tenant)
    return summary


def check_augment(cfg: TrainConfig, input_shape: list[int]) -> None:
    """Augmentation that fits the model's input: a crop padding or a shift smaller than the
    image's smaller side (a larger one could move the whole image out of view)."""
    aug = cfg.augment
    if aug is None:
        return
    side = min(input_shape[1], input_shape[2])
    if aug.random_crop is not None and aug.random_crop.padding >= side:
        raise unprocessable("train.augment.random_crop.padding",
                            f"{aug.random_crop.padding} must be smaller than the input's "
                            f"smaller side {side} (input {input_shape[1]}x{input_shape[2]})")
    if aug.translate >= side:
        raise unprocessable("train.augment.translate",
                            f"{aug.translate} must be smaller than the input's smaller side "
                            f"{side} (input {input_shape[1]}x{input_shape[2]})")


def check_devices(req: TrainJobRequest, settings: Settings, summary: dict[str, Any]) -> None:
    """resources.devices within max_devices_per_job and at most the global batch (every rank
    takes a share of each batch); a multi-device job's summary shows the per-rank batch."""
    devices = req.resources.devices
    if devices > settings.max_devices_per_job:
        raise unprocessable("resources.devices", f"{devices} exceeds the limit "
                                                 f"max_devices_per_job="
                                                 f"{settings.max_devices_per_job}")
    if devices > req.train.batch_size:
        raise unprocessable("resources.devices", f"{devices} devices for a global batch_size of "
                                                 f"{req.train.batch_size}: each rank needs at "
                                                 "least one sample of every batch")
    if devices > 1 or req.resources.sync_batch_norm:
        summary["resources"] = {
            "devices": devices, "global_batch": req.train.batch_size,
            # shares differ by at most one sample (tensor_split of each batch)
            "per_rank_batch": -(-req.train.batch_size // devices),
            "sync_batch_norm": req.resources.sync_batch_norm,
        }


# forward, and backward at about twice the forward's cost
TRAIN_FLOPS_FACTOR = 3


def job_flops_limit(settings: Settings, tenant: str) -> float:
    return settings.max_job_flops_by_tenant.get(tenant, settings.max_job_flops)


def check_work(summary: dict[str, Any], samples: int, epochs: int, settings: Settings, *,
               tenant: str) -> None:
    """A train job's estimated work (FLOPs per sample x 3 x samples x epochs) against the
    tenant's limit: a tiny model with a huge padding would otherwise be accepted and run for
    days. Admins are not exempt (the limit protects the workers)."""
    per_sample = int(summary["total_flops"])
    work = per_sample * TRAIN_FLOPS_FACTOR * samples * epochs
    limit = job_flops_limit(settings, tenant)
    if work > limit:
        raise unprocessable("train.epochs",
                            f"estimated work {work:.3g} FLOPs ({per_sample} FLOPs per sample "
                            f"for the model x {TRAIN_FLOPS_FACTOR} for forward and backward x "
                            f"{samples} samples x {epochs} epochs) exceeds the limit "
                            f"max_job_flops={limit:.3g} of tenant {tenant!r}; use fewer epochs, "
                            "a smaller model or smaller inputs")


def check_timeout(req: Any, settings: Settings) -> float:
    """The job's running-time limit in seconds: the request's `timeout`, or the default; 422
    past max_job_timeout_seconds."""
    timeout = getattr(req, "timeout", None)
    if timeout is None:
        return min(settings.job_timeout_seconds, settings.max_job_timeout_seconds)
    if timeout > settings.max_job_timeout_seconds:
        raise unprocessable("timeout", f"{timeout:g} s exceeds the limit "
                                       f"max_job_timeout_seconds="
                                       f"{settings.max_job_timeout_seconds:g}")
    return float(timeout)
