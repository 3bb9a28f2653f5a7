"""Feature-map jobs end to end: uploads, submission checks, the worker's extraction and the
download routes, through the real API, Redis, a Celery worker and PostgreSQL."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from safetensors.numpy import save as save_safetensors

from tests.factories import (
    checkpoint_upload,
    digits_cnn,
    feature_maps_request,
    inputs_upload,
    npy_bytes,
    train_request,
)
from tests.services import Stack, wait_job

# The hand-made example of DESIGN.md: a 5x5x3 input, two 3x3x3 filters, padding 1, stride 2.
X = np.array([
    [[0, 1, 1, 2, 2], [0, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 1, 1], [0, 2, 0, 1, 0]],
    [[1, 1, 1, 2, 0], [0, 2, 1, 1, 2], [1, 2, 0, 0, 2], [0, 2, 1, 2, 1], [2, 0, 1, 2, 0]],
    [[2, 0, 2, 0, 2], [0, 0, 1, 2, 1], [1, 0, 2, 2, 1], [2, 0, 2, 0, 0], [0, 0, 1, 1, 2]],
], dtype=np.float32)
W = np.array([
    [[[-1, 1, 0], [0, 1, 0], [0, 1, 1]], [[-1, -1, 0], [0, 0, 0], [0, -1, 0]],
     [[0, 0, -1], [0, 1, 0], [1, -1, -1]]],
    [[[1, 1, -1], [-1, -1, 1], [0, -1, 1]], [[0, 1, 0], [-1, 0, -1], [-1, 1, 0]],
     [[-1, 0, 0], [-1, 0, 1], [-1, 0, 0]]],
], dtype=np.float32)
B = np.array([1, 0], dtype=np.float32)
ONE_CONV = {"input_shape": [3, 5, 5], "layers": [
    {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "stride": 2, "padding": 1}]}


def conv_by_hand(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int
                 ) -> np.ndarray:
    c, h, wd = x.shape
    padded = np.zeros((c, h + 2 * pad, wd + 2 * pad), dtype=np.float32)
    padded[:, pad:pad + h, pad:pad + wd] = x
    k, _, f, _ = w.shape
    oh, ow = (h + 2 * pad - f) // stride + 1, (wd + 2 * pad - f) // stride + 1
    out = np.zeros((k, oh, ow), dtype=np.float32)
    for o in range(k):
        for i in range(oh):
            for j in range(ow):
                total = np.float32(0)
                for ch in range(c):
                    for di in range(f):
                        for dj in range(f):
                            total += padded[ch, i * stride + di, j * stride + dj] * w[o, ch, di, dj]
                out[o, i, j] = total + b[o]
    return out


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def upload_checkpoint(client, blob: bytes, model: dict):  # type: ignore[no-untyped-def]
    return client.post("/v1/checkpoints", **checkpoint_upload(blob, model))


def upload_inputs(client, blob: bytes, filename: str = "x.npy"):  # type: ignore[no-untyped-def]
    return client.post("/v1/inputs", **inputs_upload(blob, filename=filename))


def run_job(client, **body) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/v1/jobs", json=feature_maps_request(**body))
    assert r.status_code == 201, r.text
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    return done


def maps(client, job_id: str, layer: str, **params) -> np.ndarray:  # type: ignore[no-untyped-def]
    r = client.get(f"/v1/jobs/{job_id}/feature-maps/{layer}", params=params)
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_one_conv_layer_equals_the_stack_computed_by_hand(client):
    r = upload_checkpoint(client, save_safetensors({"layers.0.weight": W, "layers.0.bias": B}),
                          ONE_CONV)
    assert r.status_code == 201, r.text
    ckpt = r.json()
    assert ckpt["meta"]["tensors"] == 2
    r = upload_inputs(client, npy_bytes(X[None]))
    assert r.status_code == 201, r.text
    assert r.json()["meta"] == {"format": "npy", "count": 1, "shape": [3, 5, 5]}
    job = run_job(client, source={"checkpoint_id": ckpt["id"]},
                  inputs={"input_id": r.json()["id"]})
    assert job["summary"]["layers"][0]["output_shape"] == [2, 3, 3]

    listed = client.get(f"/v1/jobs/{job['id']}/feature-maps").json()["layers"]
    assert [(m["name"], m["shape"], m["dtype"]) for m in listed] == [
        ("0-conv2d", [1, 2, 3, 3], "float32")]
    got = maps(client, job["id"], "0-conv2d")
    expected = conv_by_hand(X, W, B, stride=2, pad=1)
    assert got.dtype == np.float32
    assert np.array_equal(got[0], expected), (got[0], expected)
    assert listed[0]["stats"]["max"] == [float(expected[0].max()), float(expected[1].max())]
    # by index too, and as JSON
    as_json = client.get(f"/v1/jobs/{job['id']}/feature-maps/0", params={"format": "json"})
    assert np.array_equal(np.asarray(as_json.json()["values"], dtype=np.float32)[0], expected)


def test_pooled_maps_are_window_maxima_and_means_and_argmax_points_at_them(client):
    model = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
        {"type": "avgpool2d", "kernel_size": 2}]}
    base = {"source": {"model": model, "seed": 3},
            "inputs": {"dataset": "digits", "indices": [0, 1, 2, 3]}, "png": False}
    job = run_job(client, **base)
    relu = maps(client, job["id"], "1-relu")
    mp = maps(client, job["id"], "2-maxpool2d")
    ap = maps(client, job["id"], "3-avgpool2d")
    argmax = maps(client, job["id"], "2-maxpool2d", array="argmax")
    got = client.get(f"/v1/jobs/{job['id']}/feature-maps/2-maxpool2d",
                     params={"array": "argmax"})
    # the headers describe the argmax file (they said the maps' float32)
    assert got.headers["x-dtype"] == str(argmax.dtype) != str(mp.dtype)
    assert got.headers["x-shape"] == ",".join(map(str, argmax.shape))
    n = len(relu)
    windows = relu.reshape(n, 3, 4, 2, 4, 2)
    assert np.array_equal(mp, windows.max(axis=(3, 5)))
    assert np.allclose(ap, mp.reshape(n, 3, 2, 2, 2, 2).mean(axis=(3, 5)), rtol=1e-6, atol=1e-7)
    flat = relu.reshape(n, 3, 64)
    assert np.array_equal(np.take_along_axis(flat, argmax.reshape(n, 3, 16), 2).reshape(mp.shape),
                          mp)
    rows, cols = np.divmod(argmax, 8)
    assert (rows // 2 == np.arange(4)[:, None]).all() and (cols // 2 == np.arange(4)).all()

    # extra pooling of the returned maps: 8x8 in 3x3 windows keeps the partial edge windows
    pooled = run_job(client, **base, layers=["1-relu"], pool={"type": "max", "kernel_size": 3})
    got = maps(client, pooled["id"], "1-relu")
    want = np.array([[[[relu[i, c, 3 * a:3 * a + 3, 3 * b:3 * b + 3].max() for b in range(3)]
                       for a in range(3)] for c in range(3)] for i in range(n)])
    assert np.array_equal(got, want)
    assert pooled["result"]["bytes_stored"] == n * 3 * 9 * 4
    assert pooled["result"]["bytes_unpooled"] == n * 3 * 64 * 4
    mean = run_job(client, **base, layers=["1"], pool={"type": "avg", "global": True})
    assert np.allclose(maps(client, mean["id"], "1-relu")[..., 0, 0], relu.mean(axis=(2, 3)),
                       rtol=1e-6, atol=1e-7)


def test_trained_digits_model_gives_every_layer_with_the_predicted_shapes(client):
    spec = digits_cnn(8)
    train = client.post("/v1/jobs", json=train_request(1, model=spec)).json()
    assert wait_job(client, train["id"])["state"] == "succeeded"
    predicted = client.post("/v1/models/summary", json=spec).json()["layers"]
    job = run_job(client, source={"job_id": train["id"], "checkpoint": "epoch-0001.safetensors"},
                  inputs={"dataset": {"name": "digits"}, "indices": list(range(200)),
                          "split": "val"})
    listed = client.get(f"/v1/jobs/{job['id']}/feature-maps").json()
    names = ["0-conv2d", "1-relu", "2-maxpool2d", "3-flatten", "4-linear"]
    assert [m["name"] for m in listed["layers"]] == names == job["result"]["layers"]
    assert [m["shape"] for m in listed["layers"]] == [[200, *p["output_shape"]]
                                                      for p in predicted]
    assert [p["receptive_field"] for p in predicted[:3]] == [[3, 3], [3, 3], [4, 4]]
    relu = listed["layers"][1]
    assert len(relu["stats"]["zero_fraction"]) == 8 and min(relu["stats"]["min"]) == 0.0
    assert any(f > 0 for f in relu["stats"]["zero_fraction"])
    assert listed["layers"][2]["has_argmax"] and not listed["layers"][0]["has_argmax"]
    assert job["result"]["timings"]["forward_s"] > 0

    picture = client.get(f"/v1/jobs/{job['id']}/feature-maps/0-conv2d",
                         params={"format": "png", "image": 7})
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    # 8 channels in a 3x3 grid of 8x8 maps enlarged 4x, 1-pixel gaps
    assert Image.open(io.BytesIO(picture.content)).size == (3 * 33 - 1, 3 * 33 - 1)
    too_big = client.get(f"/v1/jobs/{job['id']}/feature-maps/0-conv2d",
                         params={"format": "json"})
    assert too_big.status_code == 413 and "max_json_map_values" in too_big.text
    one = client.get(f"/v1/jobs/{job['id']}/feature-maps/0-conv2d",
                     params={"format": "json", "image": 1}).json()
    assert one["shape"] == [1, 8, 8, 8]
    base = f"/v1/jobs/{job['id']}/feature-maps"
    assert client.get(f"{base}/..%2F..%2Fsecrets").status_code == 404
    assert client.get(f"{base}/9-conv2d").status_code == 404
    assert client.get(f"{base}/0", params={"format": "png", "image": 200}).status_code == 404
    assert client.get(f"{base}/3-flatten", params={"format": "png"}).status_code == 404
    assert client.get(f"/v1/jobs/{train['id']}/feature-maps").status_code == 404


def test_an_uploaded_image_is_converted_to_the_model_input(client):
    rgb = Image.new("RGB", (40, 20), (255, 0, 0))
    r = upload_inputs(client, png(rgb), "red.png")
    assert r.status_code == 201, r.text
    assert r.json()["meta"]["width"] == 40
    job = run_job(client, source={"model": digits_cnn(4), "seed": 0},
                  inputs={"input_id": r.json()["id"]}, layers=["0"])
    assert job["result"]["images"] == 1
    assert maps(client, job["id"], "0-conv2d").shape == (1, 4, 8, 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_an_uploaded_jpeg_is_oriented_converted_and_resized_to_the_model_input(client,
                                                                                channels):
    # 40 wide, 20 high, no two pixels alike; EXIF orientation 6 says "turn 90 degrees
    # clockwise to show", so the picture is 20 wide, 40 high.
    yy, xx = np.mgrid[0:20, 0:40]
    pixels = np.stack([xx * 6, yy * 12, 255 - xx * 3 - yy * 5], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=95, exif=exif)
    jpeg = buf.getvalue()
    r = upload_inputs(client, jpeg, "photo.jpg")
    assert r.status_code == 201, r.text
    assert r.json()["meta"] == {"format": "jpeg", "width": 40, "height": 20, "mode": "RGB",
                                "count": 1}

    # A 1x1 convolution with identity weights: its maps are the model input itself.
    h, w = 6, 10
    model = {"input_shape": [channels, h, w], "layers": [
        {"type": "conv2d", "out_channels": channels, "kernel_size": 1}]}
    weights = {"layers.0.weight": np.eye(channels, dtype=np.float32)[:, :, None, None],
               "layers.0.bias": np.zeros(channels, dtype=np.float32)}
    ckpt = upload_checkpoint(client, save_safetensors(weights), model)
    assert ckpt.status_code == 201, ckpt.text
    job = run_job(client, source={"checkpoint_id": ckpt.json()["id"]},
                  inputs={"input_id": r.json()["id"]})
    assert job["result"]["images"] == 1
    got = maps(client, job["id"], "0-conv2d")
    assert got.shape == (1, channels, h, w) and got.dtype == np.float32

    # The rule of docs/feature-maps.md, done here with Pillow: orient, convert, resize, scale.
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))
    assert shown.size == (20, 40)
    want = np.asarray(shown.convert("L" if channels == 1 else "RGB")
                      .resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    want = want[None] if channels == 1 else want.transpose(2, 0, 1)
    assert np.allclose(got[0], want, atol=1e-6), np.abs(got[0] - want).max()
    # not the same as ignoring the orientation (the test image tells the two apart)
    unturned = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L" if channels == 1 else "RGB")
                          .resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    unturned = unturned[None] if channels == 1 else unturned.transpose(2, 0, 1)
    assert np.abs(unturned - want).max() > 0.1


def stored_files(stack: Stack) -> set[str]:
    """Every file and folder under the stack's artifact root (uploads, job artifacts, and any
    temporary file a write left behind)."""
    root = Path(stack.env.get("CONVOY_ARTIFACT_ROOT") or stack.home / "artifacts")
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def counts(client) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    jobs = client.get("/v1/jobs", params={"kind": "feature_maps", "limit": 200}).json()
    return (len(jobs["items"]), len(client.get("/v1/checkpoints").json()),
            len(client.get("/v1/inputs").json()))


@pytest.mark.parametrize("case", ["not_safetensors", "mismatch", "missing", "bad_image", "bomb",
                                  "index", "layer", "npy_shape"])
def test_bad_input_is_refused_naming_it_and_leaves_nothing(client, stack, case):
    before, on_disk = counts(client), stored_files(stack)
    fields = {"source": {"model": digits_cnn(4), "seed": 0},
              "inputs": {"dataset": "digits", "indices": [0, 1]}}
    if case == "not_safetensors":
        r = upload_checkpoint(client, b"PK\x03\x04 this is a zip, not safetensors", ONE_CONV)
        assert r.status_code == 422 and "safetensors" in r.text
    elif case == "mismatch":
        r = upload_checkpoint(client, save_safetensors(
            {"layers.0.weight": W[:, :2], "layers.0.bias": B}), ONE_CONV)
        assert r.status_code == 422 and "layers.0.weight" in r.text and "[2, 3, 3, 3]" in r.text
    elif case == "missing":
        r = upload_checkpoint(client, save_safetensors({"layers.0.weight": W}), ONE_CONV)
        assert r.status_code == 422 and "layers.0.bias" in r.text
    elif case == "bad_image":
        r = upload_inputs(client, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "broken.png")
        assert r.status_code == 422 and "decoded" in r.text
    elif case == "bomb":
        r = upload_inputs(client, png(Image.new("1", (5000, 5000))), "bomb.png")
        assert r.status_code == 413 and "max_image_pixels" in r.text
    elif case == "npy_shape":
        iid = upload_inputs(client, npy_bytes(X[None])).json()["id"]
        before, on_disk = counts(client), stored_files(stack)
        r = client.post("/v1/jobs", json={"kind": "feature_maps", **fields,
                                          "inputs": {"input_id": iid}})
        assert r.status_code == 422 and "input_id" in r.text
    else:
        if case == "index":
            fields["inputs"]["indices"] = [0, 1797]
            where = ["body", "inputs", "indices", 1]
        else:
            fields["layers"] = ["2-maxpool2d", "7-conv2d"]
            where = ["body", "layers", 1]
        r = client.post("/v1/jobs", json={"kind": "feature_maps", **fields})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == where
        assert ("1797" if case == "index" else "7-conv2d") in r.json()["detail"][0]["msg"]
    assert counts(client) == before
    assert stored_files(stack) == on_disk, "a refused request wrote to the artifact root"


def test_another_tenants_uploads_and_maps_are_not_found(client, stack):
    ckpt = upload_checkpoint(client, save_safetensors({"layers.0.weight": W, "layers.0.bias": B}),
                             ONE_CONV).json()
    inp = upload_inputs(client, npy_bytes(X[None])).json()
    job = run_job(client, source={"checkpoint_id": ckpt["id"]}, inputs={"input_id": inp["id"]},
                  png=False)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    secret = client.post("/v1/tokens", json={"tenant": tenant}).json()["token"]
    with stack.client(secret) as other:
        assert other.get(f"/v1/checkpoints/{ckpt['id']}").status_code == 404
        assert other.get(f"/v1/inputs/{inp['id']}").status_code == 404
        assert other.get("/v1/checkpoints").json() == []
        assert other.get(f"/v1/jobs/{job['id']}/feature-maps").status_code == 404
        assert other.get(f"/v1/jobs/{job['id']}/feature-maps/0-conv2d").status_code == 404
        r = other.post("/v1/jobs", json={"kind": "feature_maps",
                                         "source": {"checkpoint_id": ckpt["id"]},
                                         "inputs": {"input_id": inp["id"]}})
        assert r.status_code == 404 and "source.checkpoint_id" in r.text
        r = other.post("/v1/jobs", json={"kind": "feature_maps", "source": {"job_id": job["id"]},
                                         "inputs": {"dataset": "digits"}})
        assert r.status_code == 404 and "source.job_id" in r.text


def test_a_damaged_map_file_does_not_match_the_sent_digest(client, stack):
    """X-Sha256 of a streamed .npy download is the sha256 recorded when the map was written
    (the row's, listed too): a file damaged since then no longer matches it, which a client
    verifying the download sees."""
    import hashlib

    model = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1}]}
    job = run_job(client, source={"model": model, "seed": 1},
                  inputs={"dataset": "digits", "indices": [0]}, png=False)
    url = f"/v1/jobs/{job['id']}/feature-maps/0-conv2d"
    listed = client.get(f"/v1/jobs/{job['id']}/feature-maps").json()["layers"][0]
    clean = client.get(url)
    assert clean.status_code == 200
    assert clean.headers["X-Sha256"] == hashlib.sha256(clean.content).hexdigest()
    assert clean.headers["X-Sha256"] == listed["sha256"]
    root = Path(stack.env.get("CONVOY_ARTIFACT_ROOT") or stack.home / "artifacts")
    [path] = [p for p in root.rglob("*.npy") if job["id"] in str(p) and "0-conv2d" in p.name]
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last two float32 values, flipped
    path.write_bytes(bytes(data))
    damaged = client.get(url)
    assert damaged.content == bytes(data)
    assert damaged.headers["X-Sha256"] == listed["sha256"]
    assert hashlib.sha256(damaged.content).hexdigest() != damaged.headers["X-Sha256"]


def png_files(stack: Stack, job_id: str) -> list[str]:
    return sorted(f for f in stored_files(stack)
                  if f.startswith(f"jobs/{job_id}/feature-maps/png/") and f.endswith(".png"))


def test_a_lazy_png_is_byte_identical_to_the_eager_one_and_cached(client, stack):
    source = {"model": digits_cnn(8), "seed": 3}
    inputs = {"dataset": "digits", "split": "train", "indices": {"start": 100, "stop": 140}}
    eager = run_job(client, source=source, inputs=inputs, png="eager")
    lazy = run_job(client, source=source, inputs=inputs)  # png: lazy by default
    off = run_job(client, source=source, inputs=inputs, png="off", layers=["0"])
    assert eager["result"]["images"] == lazy["result"]["images"] == 40
    assert lazy["progress"] == 1
    # the eager job stored a grid per image of each [C, H, W] layer; the lazy one none yet
    assert len(png_files(stack, eager["id"])) == 40 * 3
    assert png_files(stack, lazy["id"]) == []
    for layer, k in (("0-conv2d", 0), ("1-relu", 17), ("2-maxpool2d", 39)):
        url = "/v1/jobs/{}/feature-maps/" + layer
        want = client.get(url.format(eager["id"]), params={"format": "png", "image": k})
        first = client.get(url.format(lazy["id"]), params={"format": "png", "image": k})
        assert want.status_code == first.status_code == 200
        assert first.content == want.content, (layer, k)
        again = client.get(url.format(lazy["id"]), params={"format": "png", "image": k})
        assert again.content == want.content
    assert len(png_files(stack, lazy["id"])) == 3  # each cached once, in the job's folder
    r = client.get(f"/v1/jobs/{off['id']}/feature-maps/0", params={"format": "png"})
    assert r.status_code == 404 and "png: off" in r.text
    # the JSON slice of one image reads that image's rows: the same values as the .npy
    whole = maps(client, lazy["id"], "2-maxpool2d")
    one = client.get(f"/v1/jobs/{lazy['id']}/feature-maps/2", params={"format": "json",
                                                                       "image": 39}).json()
    assert np.array_equal(np.asarray(one["values"], dtype=np.float32), whole[39:40])
    assert np.array_equal(maps(client, lazy["id"], "2-maxpool2d", image=5, array="argmax"),
                          maps(client, lazy["id"], "2-maxpool2d", array="argmax")[5:6])


def test_a_whole_split_as_inputs_and_its_limits(client):
    job = run_job(client, source={"model": digits_cnn(2), "seed": 0},
                  inputs={"dataset": "digits", "split": "val", "indices": "all"}, layers=["0"])
    assert job["result"]["images"] == 359
    assert job["summary"]["feature_maps"]["inputs"]["indices"] == {"start": 0, "stop": 359}
    assert maps(client, job["id"], "0").shape == (359, 2, 8, 8)
    body = feature_maps_request({"model": digits_cnn(2), "seed": 0}, layers=["0"])
    for indices, field, words in (
            ({"start": 0, "stop": 360}, "stop", "360 is out of range"),
            ({"start": 5, "stop": 5}, "indices", "is empty"),
            ({"start": 0}, "stop", "Field required"),
            ({"start": -1, "stop": 3}, "start", "greater than or equal to 0")):
        r = client.post("/v1/jobs", json={**body, "inputs": {
            "dataset": "digits", "split": "val", "indices": indices}})
        assert r.status_code == 422, r.text
        assert field in r.text and words in r.text, r.text
    big = {"name": "synthetic", "samples": 100_001, "size": 8, "channels": 1}
    r = client.post("/v1/jobs", json={**feature_maps_request(
        {"model": {"input_shape": [1, 8, 8], "layers": [
            {"type": "conv2d", "out_channels": 1, "kernel_size": 3}]}, "seed": 0}),
        "inputs": {"dataset": big, "indices": "all"}})
    assert r.status_code == 422 and "at most 100000" in r.text, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "inputs", "indices"]
    # a model whose maps pool to almost nothing still costs its forward passes: the work of
    # a whole split through two convolutions padded by 60 (1.3 GFLOPs per 8x8 input) is
    # refused at submission
    padded = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 60},
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1}]}
    r = client.post("/v1/jobs", json={**feature_maps_request(
        {"model": padded, "seed": 0}, pool={"type": "avg", "global": True}),
        "inputs": {"dataset": {"name": "synthetic", "samples": 100_000, "size": 8,
                               "channels": 1}, "indices": "all"}})
    assert r.status_code == 422 and "max_job_flops" in r.text, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "inputs", "indices"]
