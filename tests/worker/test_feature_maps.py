"""The extraction pieces on their own: capture against a bare hooked forward pass, the extra
pooling rule, the PNG grid, the image conversion rule, and one job run directly on SQLite."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from api.feature_maps import check_feature_maps
from convoy import inputs
from convoy.jobspec import FeatureMapsJobRequest, dump
from convoy.render import grid_shape, png_bytes
from convoy.settings import Settings
from db import job_reads, jobs
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Artifact
from models.build import build_model
from models.capture import capture, channels_last, extra_pool
from models.pooling import pooled_shape
from models.spec import ModelSpec
from tests.factories import npy_bytes
from worker.feature_maps import run_feature_maps


def hooked_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
               for m in model.layers]
    model(x)
    for h in handles:
        h.remove()
    return outputs


def test_capture_equals_a_hooked_forward_pass_on_every_layer():
    torch.manual_seed(0)
    model = build_model(ModelSpec.model_validate({"preset": "vgg-small"})).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = hooked_outputs(model, x)
        got = capture(model, x, range(len(expected)))
    assert sorted(got) == list(range(len(expected)))
    for i, out in enumerate(expected):
        assert torch.equal(got[i].maps, out), i
        pooling = isinstance(model.layers[i], torch.nn.MaxPool2d)
        assert (got[i].argmax is not None) == pooling
        if pooling:
            before = expected[i - 1].flatten(2)
            picked = before.gather(2, got[i].argmax.flatten(2)).view_as(out)
            assert torch.equal(picked, out)


def test_capture_in_channels_last_gives_the_same_maps():
    torch.manual_seed(0)
    model = build_model(ModelSpec.model_validate({"preset": "vgg-small"})).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = hooked_outputs(model, x)
        fast = channels_last(model)
        got = capture(fast, channels_last(fast, x), range(len(expected)))
    for i, out in enumerate(expected):
        assert torch.allclose(got[i].maps, out, rtol=1e-5, atol=1e-5), i
        if got[i].argmax is not None:
            before = expected[i - 1].flatten(2)
            picked = before.gather(2, got[i].argmax.contiguous().flatten(2)).view_as(out)
            assert torch.allclose(picked, out, rtol=1e-5, atol=1e-5)


def test_capture_returns_only_the_wanted_layers():
    model = build_model(ModelSpec.model_validate({"preset": "vgg-small"})).eval()
    with torch.inference_mode():
        got = capture(model, torch.randn(2, 3, 32, 32), [0, 2])
    assert sorted(got) == [0, 2]


@pytest.mark.parametrize(("h", "w", "pool"), [
    (8, 8, {"type": "max", "kernel_size": 2}), (7, 5, {"type": "max", "kernel_size": 3}),
    (5, 9, {"type": "avg", "kernel_size": 4}), (3, 3, {"type": "avg", "kernel_size": 16}),
    (6, 4, {"type": "max", "global": True}), (6, 4, {"type": "avg", "global": True}),
])
def test_extra_pooling_gives_the_shape_the_api_predicted(h, w, pool):
    t = torch.randn(2, 3, h, w)
    pooled = extra_pool(t, pool)
    assert list(pooled.shape[1:]) == pooled_shape([3, h, w], pool)
    if pool["type"] == "max":  # every value is kept by some window, edge windows included
        assert torch.equal(pooled.amax(dim=(2, 3)), t.amax(dim=(2, 3)))
    elif pool.get("global"):
        assert torch.allclose(pooled[..., 0, 0], t.mean(dim=(2, 3)))
    else:  # the first window, and the bottom-right one that may be cut by the edge
        k = min(pool["kernel_size"], h), min(pool["kernel_size"], w)
        assert torch.allclose(pooled[..., 0, 0], t[..., :k[0], :k[1]].mean(dim=(2, 3)))
        last = t[..., (pooled.shape[2] - 1) * k[0]:, (pooled.shape[3] - 1) * k[1]:]
        assert torch.allclose(pooled[..., -1, -1], last.mean(dim=(2, 3)))


def test_png_tiles_channels_each_on_its_own_scale():
    maps = np.random.default_rng(0).normal(size=(5, 6, 6)).astype(np.float32)
    scaled = maps * np.array([1, 10, 100, 1000, 0.01], dtype=np.float32)[:, None, None]
    scaled[4] = 7.0  # a constant channel is drawn, not divided by zero
    image = np.asarray(Image.open(io.BytesIO(png_bytes(scaled))))
    rows, cols = grid_shape(5)
    assert (rows, cols) == (2, 3)
    tile = 6 * 6  # 6x6 maps enlarged 6x to reach 32+ pixels
    assert image.shape == (rows * (tile + 1) - 1, cols * (tile + 1) - 1, 3)
    same = np.asarray(Image.open(io.BytesIO(png_bytes(maps))))
    assert np.array_equal(image[:tile, :3 * tile + 2], same[:tile, :3 * tile + 2])


def test_image_rule_converts_mode_and_size():
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buf, "PNG")
    grey = inputs.image_to_array(buf.getvalue(), (1, 8, 8), max_pixels=10_000)
    assert grey.shape == (1, 1, 8, 8) and grey.dtype == np.float32
    assert np.allclose(grey, 76 / 255)  # ITU-R 601 luma of pure red
    rgb = inputs.image_to_array(buf.getvalue(), (3, 4, 6), max_pixels=10_000)
    assert rgb.shape == (1, 3, 4, 6) and np.allclose(rgb[0, :, 0, 0], [1, 0, 0])
    with pytest.raises(inputs.BadInput) as info:
        inputs.image_to_array(buf.getvalue(), (1, 8, 8), max_pixels=799)
    assert info.value.status == 413


def test_npy_with_pickled_objects_is_refused():
    with pytest.raises(inputs.BadInput, match="pickles"):
        inputs.parse_npy(npy_bytes(np.array([{"a": 1}], dtype=object)), max_pixels=100)


def test_a_job_run_directly_stores_every_artifact_with_its_row(tmp_path):
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    spec = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel_size": 3},
        {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"}]}
    req = FeatureMapsJobRequest.model_validate({
        "kind": "feature_maps", "source": {"model": spec, "seed": 1},
        "inputs": {"dataset": "digits", "indices": [5, 6, 7]}, "dtype": "float16",
        "png": "eager"})
    with session_scope(settings.database_url) as session:
        summary = check_feature_maps(session, req, settings, tenant="t1")
        job = jobs.create_job(session, tenant="t1", kind="feature_maps", name="", request=dump(req),
                              summary=summary, max_attempts=1)
        job_id = job.id
    with session_scope(settings.database_url) as session:
        claimed = jobs.claim_job(session, job_id=job_id, worker_id="w")
    run_feature_maps(settings, claimed, "w")
    with session_scope(settings.database_url) as session:
        done = job_reads.get_job(session, job_id=job_id)
        rows = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
    assert done.state == "succeeded", done.error
    kinds = sorted((r.kind, r.name) for r in rows)
    assert kinds == [("argmax", "1-maxpool2d"),
                     ("feature_map", "0-conv2d"), ("feature_map", "1-maxpool2d"),
                     ("feature_map", "2-flatten"),
                     *[("feature_map_png", f"{n}/{k}") for n in ("0-conv2d", "1-maxpool2d")
                       for k in range(3)]]
    store_root = settings.artifacts_dir
    for r in rows:
        assert (store_root / r.key).stat().st_size == r.size
    conv = next(r for r in rows if r.name == "0-conv2d" and r.kind == "feature_map")
    arr = np.load(store_root / conv.key, allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == (3, 2, 6, 6)
    assert done.result["bytes_stored"] == 2 * 3 * (2 * 36 + 2 * 9 + 18)
    assert set(done.result["timings"]) >= {"forward_s", "encode_npy_s", "encode_png_s",
                                           "storage_s"}


def test_a_streamed_npy_is_the_bytes_np_save_writes_and_an_abort_leaves_nothing(tmp_path):
    from convoy.artifacts import LocalStore
    from worker.npystream import NpyStream

    store = LocalStore(tmp_path)
    maps = np.random.default_rng(0).normal(size=(700, 3, 5, 4)).astype(np.float16)
    seen = []
    stream = NpyStream(store, "a/maps.npy", maps.shape, maps.dtype, observe=seen.append)
    for start in range(0, 700, 256):
        stream.append(maps[start:start + 256])
    size, sha = stream.close()
    assert store.get_bytes("a/maps.npy") == npy_bytes(maps)
    assert (size, sha) == (len(npy_bytes(maps)), hashlib.sha256(npy_bytes(maps)).hexdigest())
    assert [len(s) for s in seen] == [256, 256, 188]
    short = NpyStream(store, "a/short.npy", (10, 2), np.float32)
    short.append(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="4 rows written of 10"):
        short.close()
    wrong = NpyStream(store, "a/wrong.npy", (10, 2), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        wrong.append(np.zeros((4, 3), np.float32))
    wrong.append(np.zeros((4, 2), np.float32))
    wrong.abort()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["maps.npy"]


def test_a_streamed_npy_of_channels_last_views_holds_the_nchw_bytes(tmp_path):
    """extract_batches hands a job's streams views of channels-last maps on CPU; each
    stream's writer thread makes the C-ordered (NCHW) copy the .npy holds, and its
    statistics see the same values."""
    from convoy.artifacts import LocalStore
    from convoy.render import channel_stats
    from worker.npystream import NpyStream

    maps = np.random.default_rng(2).normal(size=(300, 6, 5, 4)).astype(np.float32)
    cl = torch.from_numpy(maps).contiguous(memory_format=torch.channels_last)
    assert not cl.numpy().flags.c_contiguous
    seen = []
    stream = NpyStream(LocalStore(tmp_path), "a/maps.npy", maps.shape, maps.dtype,
                       observe=seen.append)
    for start in range(0, 300, 128):
        stream.append(cl[start:start + 128].numpy())
    stream.close()
    assert (tmp_path / "a" / "maps.npy").read_bytes() == npy_bytes(maps)
    assert all(block.flags.c_contiguous for block in seen)
    assert channel_stats(np.concatenate(seen)) == channel_stats(maps)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(300, 5, 7, 3), (300, 9)])
def test_statistics_accumulated_by_batch_equal_those_of_all_the_maps(shape, dtype):
    from convoy.render import ChannelStats, channel_stats

    x = np.random.default_rng(1).normal(size=shape).astype(dtype)
    x[x < 0] = 0  # a ReLU's zeros
    acc = ChannelStats()
    for start in range(0, 300, 64):
        acc.add(x[start:start + 64])
    got, want = acc.result(), channel_stats(x)
    assert got["min"] == want["min"] and got["max"] == want["max"]
    assert got["zero_fraction"] == want["zero_fraction"]
    assert np.allclose(got["mean"], want["mean"], atol=1e-6)
