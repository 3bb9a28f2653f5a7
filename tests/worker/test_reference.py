"""The rules docs/reference.md states, held to it: the digits recipe printed there gives the
split a worker loads, max-pool argmax ties go to the first position in row-major window
order (checked against torch through Convoy's own capture), and a feature-map listing's
per-channel statistics describe the stored (pooled) maps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import select

from api.feature_maps import check_feature_maps
from convoy.datasets import DIGITS_SPLIT_SIZES, load_digits
from convoy.jobspec import FeatureMapsJobRequest, dump
from convoy.render import channel_stats
from convoy.settings import Settings
from db import job_reads, jobs
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Artifact
from models.build import build_model
from models.capture import capture, channels_last
from models.spec import ModelSpec
from worker.feature_maps import run_feature_maps

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_the_digits_recipe_in_reference_md_gives_convoys_split() -> None:
    text = REFERENCE.read_text()
    section = text[text.index("### `digits`"):text.index("### `synthetic`")]
    assert "/ 16" in section and "default_rng(0)" in section
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict[str, Any] = {}
    exec(compile(code, str(REFERENCE), "exec"), scope)  # noqa: S102 - our own document
    split = load_digits()
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert np.array_equal(scope[name], getattr(split, name)), name
    assert len(split.y_train) == DIGITS_SPLIT_SIZES["train"] == 1438
    assert len(split.y_val) == DIGITS_SPLIT_SIZES["val"] == 359
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    # 17 grey levels: every value is a multiple of 1/16
    assert np.array_equal(split.x_train * 16, np.round(split.x_train * 16))


def argmax_of(x: torch.Tensor, layer: dict[str, Any], layout: torch.memory_format
              ) -> torch.Tensor:
    spec = ModelSpec.model_validate({"input_shape": list(x.shape[1:]),
                                     "layers": [{"type": "maxpool2d", **layer}]})
    model = build_model(spec).eval()
    if layout == torch.channels_last:
        model, x = channels_last(model), channels_last(model, x)
    with torch.inference_mode():
        got = capture(model, x.contiguous(memory_format=layout), [0])[0].argmax
    assert got is not None
    # the same as torch's own NCHW kernel (Convoy pools channels-last on CPU, for speed)
    _, plain = torch.nn.functional.max_pool2d(x.contiguous(), return_indices=True, **layer)
    assert torch.equal(got.contiguous(), plain)
    return got.contiguous()


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_max_pool_argmax_ties_go_to_the_first_position_in_row_major_order(
        layout: torch.memory_format) -> None:
    # windows of equal values: each 2x2 window points at its top-left element
    flat = argmax_of(torch.ones(1, 2, 4, 4), {"kernel_size": 2}, layout)
    assert flat[0, 0].flatten().tolist() == [0, 2, 8, 10]
    assert torch.equal(flat[0, 0], flat[0, 1])
    # the maximum 3 sits at (0, 1), (0, 2), (1, 0) and (2, 2): row-major order picks (0, 1),
    # where column-major order would pick (1, 0) and "last wins" (2, 2)
    x = torch.tensor([[[[1.0, 3.0, 3.0], [3.0, 2.0, 0.0], [0.0, 0.0, 3.0]]]])
    assert argmax_of(x, {"kernel_size": 3}, layout).item() == 1
    # overlapping windows with padding: padding is never chosen, ties still go first
    got = argmax_of(x, {"kernel_size": 2, "stride": 1, "padding": 1}, layout)[0, 0]
    assert got.tolist() == [[0, 1, 1, 2], [3, 1, 1, 2], [3, 3, 8, 8], [6, 6, 8, 8]]
    # a NaN is the maximum; of two NaNs, the last in row-major order
    nan = torch.zeros(1, 1, 2, 2)
    nan[0, 0, 0, 1] = nan[0, 0, 1, 1] = float("nan")
    assert argmax_of(nan, {"kernel_size": 2}, layout).item() == 3


def _run(settings: Settings, body: dict[str, Any]) -> tuple[Any, list[Artifact]]:
    req = FeatureMapsJobRequest.model_validate(body)
    with session_scope(settings.database_url) as session:
        summary = check_feature_maps(session, req, settings, tenant="t1")
        job_id = jobs.create_job(session, tenant="t1", kind="feature_maps", name="",
                                 request=dump(req), summary=summary, max_attempts=1).id
    with session_scope(settings.database_url) as session:
        claimed = jobs.claim_job(session, job_id=job_id, worker_id="w")
    run_feature_maps(settings, claimed, "w")
    with session_scope(settings.database_url) as session:
        done = job_reads.get_job(session, job_id=job_id)
        rows = list(session.scalars(select(Artifact).where(
            Artifact.job_id == job_id, Artifact.kind == "feature_map")))
    assert done.state == "succeeded", done.error
    return done, rows


def test_listing_stats_are_computed_on_the_pooled_maps(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    spec = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "relu"}]}
    base = {"kind": "feature_maps", "source": {"model": spec, "seed": 4},
            "inputs": {"dataset": "digits", "indices": [0, 1, 2, 3, 4]}, "layers": ["1-relu"],
            "png": False}
    _, (raw_row,) = _run(settings, base)
    _, (pooled_row,) = _run(settings, {**base, "pool": {"type": "max", "kernel_size": 4}})
    store = settings.artifacts_dir
    raw = np.load(store / raw_row.key, allow_pickle=False)
    pooled = np.load(store / pooled_row.key, allow_pickle=False)
    assert raw.shape == (5, 3, 8, 8) and pooled.shape == (5, 3, 2, 2)
    assert np.array_equal(pooled, raw.reshape(5, 3, 2, 4, 2, 4).max(axis=(3, 5)))
    assert raw_row.meta is not None and pooled_row.meta is not None
    assert raw_row.meta["stats"] == channel_stats(raw)
    # the pooled job's stats are the pooled maps' statistics, not the raw layer output's
    assert pooled_row.meta["stats"] == channel_stats(pooled)
    assert pooled_row.meta["stats"] != raw_row.meta["stats"]
    assert pooled_row.meta["stats"]["max"] == raw_row.meta["stats"]["max"]
    assert all(p >= r for p, r in zip(pooled_row.meta["stats"]["mean"],
                                      raw_row.meta["stats"]["mean"], strict=True))
    assert pooled_row.meta["unpooled_shape"] == [5, 3, 8, 8]
