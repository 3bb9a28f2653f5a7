"""Hostile uploads and values, against the real API and worker on PostgreSQL (and the API on
SQLite where the code path differs):

- a ~1 MB .npz that unpacks to 1 GiB is refused from its headers alone (the API's
  memory does not grow, its event loop keeps answering), and archives that lie about their
  sizes are refused too;
- a lone surrogate (`"\\ud800"`) anywhere in a request is a 422 naming the field with
  nothing stored, and a row that holds one anyway never breaks a listing;
- hostile values (safetensors headers nested 50,000 deep, offsets null or text,
  `shape: [1e400]`, a `model` form field nested 100,000 deep or with a 5,000-digit integer,
  layer names in Unicode digits) are 4xx naming the field, never 500;
- what the worker would refuse later (a synthetic seed of -5, a safetensors shape of
  16.0, a non-string `__metadata__` value) is refused at submission.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.factories import dataset_npz, digits_cnn, npy_bytes, train_request
from tests.security.conftest import make_token
from tests.services import Stack, api_on_sqlite, wait_job

GIB = 1024**3


@pytest.fixture(scope="module")
def tenant(stack: Stack) -> Iterator[httpx.Client]:
    """A tenant of its own, so that counts of its jobs and uploads mean something."""
    with stack.client() as admin:
        secret = make_token(admin, f"hostile-{uuid.uuid4().hex[:8]}")["token"]
    with stack.client(secret) as c:
        yield c


def job_ids(client: httpx.Client) -> set[str]:
    r = client.get("/v1/jobs", params={"limit": 200})
    assert r.status_code == 200, r.text
    return {j["id"] for j in r.json()["items"]}


def upload_ids(client: httpx.Client, path: str) -> set[str]:
    r = client.get(path)
    assert r.status_code == 200, r.text
    return {u["id"] for u in r.json() if not u.get("builtin")}


def error_locs(r: httpx.Response) -> list[list[Any]]:
    return [e["loc"] for e in r.json()["detail"]]


# -- the .npz bomb -----------------------------------------------------------------------------

BOMB_SHAPE = (16384, 1, 128, 128)  # float32: exactly 1 GiB


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def write_bomb(path: Path, *, header_shape: tuple[int, ...] = BOMB_SHAPE,
               zeros: int = GIB) -> None:
    """An .npz whose x.npy unpacks to `zeros` bytes after its header, written in 8 MiB chunks:
    the test process never holds more than one chunk."""
    chunk = bytes(8 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as member:
            member.write(_npy_header(header_shape))
            left = zeros
            while left > 0:
                member.write(chunk[:min(len(chunk), left)])
                left -= min(len(chunk), left)
        y = io.BytesIO()
        np.save(y, np.arange(header_shape[0]) % 10)
        zf.writestr("y.npy", y.getvalue())


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    write_bomb(path)
    data = path.read_bytes()
    assert len(data) < 2 * 1024 * 1024, len(data)  # ~1 MB on the wire
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("x.npy").file_size > GIB  # and 1 GiB unpacked
    return data


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class Poller:
    """GET /healthz in a loop from another client; keeps every latency."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                started = time.monotonic()
                assert c.get("/healthz").status_code == 200
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    def __enter__(self) -> Poller:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.latencies and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)  # at least one poll after the upload was answered
        self.stop.set()
        self.thread.join(timeout=30)


def test_npz_bomb_is_refused_from_its_headers(stack: Stack, tenant: httpx.Client,
                                              bomb: bytes) -> None:
    """1 MB that unpacks to 1 GiB: 413 naming the limit, the API's peak memory grows by far
    less than the bomb, /healthz keeps answering within 1 s, nothing is stored."""
    assert stack.api is not None
    before_ids = upload_ids(tenant, "/v1/datasets")
    before_hwm = vm_hwm(stack.api.pid)
    with Poller(stack.url) as poller:
        started = time.monotonic()
        r = tenant.post("/v1/datasets", files={"file": ("bomb.npz", bomb)})
        took = time.monotonic() - started
    assert r.status_code in (413, 422), r.text
    detail = json.dumps(r.json()["detail"])
    assert "file" in detail and "max_dataset_bytes" in detail, detail
    grew = vm_hwm(stack.api.pid) - before_hwm
    assert grew < 200 * 1024**2, f"the API's peak memory grew by {grew / 2**20:.0f} MiB"
    assert max(poller.latencies) < 1.0, f"/healthz took {max(poller.latencies):.2f} s " \
                                        f"(upload answered in {took:.2f} s)"
    assert upload_ids(tenant, "/v1/datasets") == before_ids


def test_worker_side_reader_refuses_the_bomb_too(bomb: bytes) -> None:
    """The worker reads stored datasets with the same reader: refused before unpacking."""
    from convoy import datasets

    started = time.monotonic()
    with pytest.raises(datasets.BadDataset) as caught:
        datasets.parse_npz(bomb, max_pixels=4096 * 4096, max_bytes=512 * 1024**2)
    assert caught.value.status == 413 and "max_dataset_bytes" in str(caught.value)
    assert time.monotonic() - started < 2.0


def _patch_declared_size(data: bytes, member: str, size: int) -> bytes:
    """The zip with `member`'s uncompressed size rewritten (local header and central
    directory), its compressed data and CRC left alone: a lying archive."""
    out = bytearray(data)
    name = member.encode()
    local = out.find(b"PK\x03\x04")
    while local != -1:
        name_len = struct.unpack_from("<H", out, local + 26)[0]
        if out[local + 30:local + 30 + name_len] == name:
            struct.pack_into("<I", out, local + 22, size)
        local = out.find(b"PK\x03\x04", local + 4)
    central = out.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if out[central + 46:central + 46 + name_len] == name:
            struct.pack_into("<I", out, central + 24, size)
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def _small_bomb(zeros: int, header_shape: tuple[int, ...]) -> bytes:
    """Like the bomb but without zip64, so that its size fields can be patched."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", _npy_header(header_shape) + bytes(zeros))
        y = io.BytesIO()
        np.save(y, np.arange(header_shape[0]) % 10)
        zf.writestr("y.npy", y.getvalue())
    return buf.getvalue()


def _bzip2_npz() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf:
        for name, array in (("x", np.zeros((4, 1, 8, 8), np.float32)), ("y", np.arange(4))):
            member = io.BytesIO()
            np.save(member, array)
            zf.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


@functools.cache
def _lying_archives() -> dict[str, bytes]:
    small = (4, 1, 8, 8)  # 1 KiB of float32
    honest_size = len(_npy_header(small)) + 4 * math.prod(small)
    # declared: 1 KiB; inside: 64 MiB of zeros behind a header that says 1 KiB
    lie_small = _patch_declared_size(_small_bomb(64 << 20, small), "x.npy", honest_size)
    # header: 1 KiB; declared (truthfully): 64 MiB more, trailing the array
    trailing = _small_bomb(64 << 20, small)
    # header: 1 GiB; declared: 1 KiB
    lie_header = _patch_declared_size(_small_bomb(1024, BOMB_SHAPE), "x.npy", honest_size)
    return {"declared-size-lies": lie_small, "data-past-the-header": trailing,
            "header-larger-than-declared": lie_header, "bzip2-member": _bzip2_npz()}


@pytest.mark.parametrize("what", sorted(_lying_archives()))
def test_npz_that_lies_about_its_sizes_is_refused(stack: Stack, tenant: httpx.Client,
                                                  what: str) -> None:
    data = _lying_archives()[what]
    assert stack.api is not None
    before_ids, before_hwm = upload_ids(tenant, "/v1/datasets"), vm_hwm(stack.api.pid)
    r = tenant.post("/v1/datasets", files={"file": (f"{what}.npz", data)})
    assert r.status_code in (413, 422), f"{what}: {r.status_code} {r.text[:300]}"
    assert "file" in json.dumps(r.json()["detail"])
    assert vm_hwm(stack.api.pid) - before_hwm < 100 * 1024**2
    assert upload_ids(tenant, "/v1/datasets") == before_ids


def test_npy_inputs_whose_header_does_not_match_the_file_are_refused(
        tenant: httpx.Client) -> None:
    lying = _npy_header((4096, 64, 64, 64)) + bytes(1024)  # header: 4 GiB; file: 1 KiB
    r = tenant.post("/v1/inputs", files={"file": ("x.npy", lying)})
    assert r.status_code in (413, 422), r.text
    assert "file" in json.dumps(r.json()["detail"])


def test_ordinary_npz_and_npy_uploads_still_work(tenant: httpx.Client) -> None:
    for blob in (dataset_npz(), dataset_npz(compressed=True)):
        r = tenant.post("/v1/datasets", files={"file": ("ok.npz", blob)})
        assert r.status_code == 201, r.text
        assert r.json()["input_shape"] == [1, 8, 8] and r.json()["samples"] == 40
    # the worker reads it with the same bounded reader and trains on it
    r = tenant.post("/v1/jobs", json=train_request(1, model=digits_cnn(4),
                                                   dataset={"id": r.json()["id"]}))
    assert r.status_code == 201, r.text
    assert wait_job(tenant, r.json()["id"], timeout=50)["state"] == "succeeded"
    grey = npy_bytes(np.zeros((2, 8, 8), dtype=np.uint8))
    r = tenant.post("/v1/inputs", files={"file": ("ok.npy", grey)})
    assert r.status_code == 201, r.text
    assert r.json()["meta"]["shape"] == [1, 8, 8]


# -- lone surrogates ---------------------------------------------------------------------------

def raw_json(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """`body` sent as JSON text with ASCII escapes: a lone surrogate goes out as `\\ud800`
    (httpx's own json= would refuse to encode it)."""
    return client.post(path, content=json.dumps(body),
                       headers={"content-type": "application/json"})


def test_lone_surrogate_in_a_job_body_is_422_naming_the_field_and_nothing_is_stored(
        tenant: httpx.Client) -> None:
    before = job_ids(tenant)
    body = train_request(1, model={**digits_cnn(4), "preset": "\ud800"})
    r = raw_json(tenant, "/v1/jobs", body)
    assert r.status_code == 422, r.text
    assert ["body", "model", "preset"] in error_locs(r), r.text
    # a key, and the low half alone, deeper down
    body = train_request(1, model=digits_cnn(4))
    body["model"]["layers"][0] = {**body["model"]["layers"][0], "\udc00": 1}
    r = raw_json(tenant, "/v1/jobs", body)
    assert r.status_code == 422, r.text
    assert error_locs(r)[0][:4] == ["body", "model", "layers", 0], r.text
    # the same escape in a UTF-16 body (json.loads detects and reads that encoding too)
    body = train_request(1, model={**digits_cnn(4), "preset": "\ud800"})
    r = tenant.post("/v1/jobs", content=json.dumps(body).encode("utf-16"),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert ["body", "model", "preset"] in error_locs(r), r.text
    assert job_ids(tenant) == before
    # the listings still answer
    assert tenant.get("/v1/jobs").status_code == 200


def test_paired_surrogates_are_valid_text(stack: Stack) -> None:
    """An emoji written as a surrogate pair is ordinary text and is kept as it is."""
    with stack.client() as admin:
        r = raw_json(admin, "/v1/tokens", {"tenant": "emoji", "name": "smile \U0001f600"})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "smile \U0001f600"


def test_lone_surrogate_in_the_checkpoint_model_field_is_422(tenant: httpx.Client) -> None:
    before = upload_ids(tenant, "/v1/checkpoints")
    model = json.dumps({**digits_cnn(4), "preset": "\ud800"})  # ASCII text: "\ud800"
    r = tenant.post("/v1/checkpoints", files={"file": ("c.safetensors", safetensors())},
                    data={"model": model})
    assert r.status_code == 422, r.text
    assert ["body", "model", "preset"] in error_locs(r), r.text
    assert upload_ids(tenant, "/v1/checkpoints") == before


def multipart(fields: dict[str, str | tuple[str, bytes]], charset: str) -> tuple[bytes, str]:
    """A multipart body by hand, declaring `charset` (httpx always writes UTF-8)."""
    boundary = "convoy-" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n").encode("latin-1")
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode(), \
                value.encode("latin-1")
        parts.append(f"--{boundary}\r\n".encode() + head + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}; charset={charset}"


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/checkpoints", "name"), ("/v1/checkpoints", "file"), ("/v1/checkpoints", "model"),
    ("/v1/datasets", "name"), ("/v1/datasets", "file"), ("/v1/inputs", "name")])
def test_form_text_that_decodes_to_a_lone_surrogate_is_422(tenant: httpx.Client, path: str,
                                                           field: str) -> None:
    """UTF-7 decodes `+2AA-` to U+D800: a multipart body declaring that charset."""
    blob = {"/v1/checkpoints": safetensors(), "/v1/datasets": dataset_npz(),
            "/v1/inputs": npy_bytes(np.zeros((1, 1, 8, 8), np.float32))}[path]
    fields: dict[str, str | tuple[str, bytes]] = {"file": ("x+2AA-.bin" if field == "file"
                                                           else "x.bin", blob)}
    if path == "/v1/checkpoints":
        fields["model"] = json.dumps(digits_cnn(4))
        if field == "model":
            fields["model"] = fields["model"].replace('"input_shape"', '"+2AA-input_shape"')
    if field == "name":
        fields["name"] = "+2AA-"
    before = upload_ids(tenant, path)
    body, ctype = multipart(fields, "utf-7")
    r = tenant.post(path, content=body, headers={"content-type": ctype})
    assert r.status_code == 422, r.text
    assert error_locs(r)[0][:2] == ["body", field], r.text
    assert upload_ids(tenant, path) == before


def _insert_poisoned_rows(database_url: str, tenant: str) -> tuple[str, str]:
    """A job and a checkpoint upload of `tenant` whose JSON columns hold lone surrogates,
    written straight to the database (as a bug elsewhere, or an older version, could)."""
    from db.base import utcnow
    from db.ids import new_id
    from db.session import get_engine, get_sessionmaker
    from db.tables import Job, Upload

    poison = "\ud800"
    job_id, upload_id = new_id(), new_id()
    session = get_sessionmaker(database_url)()
    try:
        session.add(Job(id=job_id, tenant=tenant, kind="train", name="poisoned",
                        state="failed", request={"model": {"preset": poison}, poison: 1},
                        summary={"layers": [{"type": poison}]},
                        result={"note": f"a{poison}b", "\udc00": [poison]},
                        created_at=utcnow(), updated_at=utcnow()))
        session.add(Upload(id=upload_id, tenant=tenant, kind="checkpoint", name="poisoned",
                           key=f"uploads/checkpoints/{upload_id}.safetensors", size=1,
                           sha256="0" * 64, meta={"model": {"preset": poison}},
                           created_at=utcnow()))
        session.commit()
    finally:
        session.close()
        get_engine(database_url).dispose()
    return job_id, upload_id


def _assert_listings_answer(client: httpx.Client, job_id: str, upload_id: str) -> None:
    r = client.get("/v1/jobs")
    assert r.status_code == 200, r.text
    listed = {j["id"]: j for j in r.json()["items"]}
    assert listed[job_id]["request"]["model"]["preset"] == "\ufffd"
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"note": "a\ufffdb", "\ufffd": ["\ufffd"]}
    assert r.json()["summary"]["layers"][0]["type"] == "\ufffd"
    r = client.get("/v1/checkpoints")
    assert r.status_code == 200, r.text
    assert {c["id"]: c for c in r.json()}[upload_id]["meta"]["model"]["preset"] == "\ufffd"
    assert client.get(f"/v1/checkpoints/{upload_id}").status_code == 200


def test_stored_lone_surrogate_never_breaks_a_listing_postgres(stack: Stack) -> None:
    with stack.client() as admin:
        secret = make_token(admin, "poisoned-pg")["token"]
    job_id, upload_id = _insert_poisoned_rows(stack.env["CONVOY_DATABASE_URL"], "poisoned-pg")
    with stack.client(secret) as client:
        _assert_listings_answer(client, job_id, upload_id)


@pytest.fixture(scope="module")
def sqlite_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API alone on SQLite (the embedded mode's database, which keeps JSON as text)."""
    with api_on_sqlite(Path(tmp_path_factory.mktemp("sqlite-api")),
                    CONVOY_REQUEUE_AFTER_SECONDS="3600") as s:
        yield s


def test_stored_lone_surrogate_never_breaks_a_listing_sqlite(sqlite_api: Stack) -> None:
    with sqlite_api.client() as admin:
        secret = make_token(admin, "poisoned-sqlite")["token"]
        r = raw_json(admin, "/v1/jobs", train_request(1, model={**digits_cnn(4),
                                                                "preset": "\ud800"}))
        assert r.status_code == 422 and ["body", "model", "preset"] in error_locs(r), r.text
    job_id, upload_id = _insert_poisoned_rows(sqlite_api.env["CONVOY_DATABASE_URL"],
                                              "poisoned-sqlite")
    with sqlite_api.client(secret) as client:
        _assert_listings_answer(client, job_id, upload_id)


# -- hostile values in checkpoints -------------------------------------------------------------

def tensors_of(model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """digits_cnn(4)'s state_dict shapes."""
    c = model["layers"][0]["out_channels"]
    return {"layers.0.weight": (c, 1, 3, 3), "layers.0.bias": (c,),
            "layers.4.weight": (10, c * 16), "layers.4.bias": (10,)}


def safetensors(mutate: Callable[[dict[str, Any]], Any] | None = None,
                text: Callable[[str], str] | None = None) -> bytes:
    """A valid safetensors file for digits_cnn(4) (zeros), its header changed by `mutate` (on
    the table) or `text` (on the JSON text)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors_of(digits_cnn(4)).items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                             offset + size]}
        offset += size
    if mutate is not None:
        mutate(header)
    raw = json.dumps(header)
    if text is not None:
        raw = text(raw)
    encoded = raw.encode()
    return len(encoded).to_bytes(8, "little") + encoded + bytes(offset)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(header: dict[str, Any]) -> None:
        name, key = path.rsplit(".", 1)
        header[name][key] = value
    return mutate


HOSTILE_HEADERS: dict[str, bytes] = {
    "nested-50000-deep": safetensors(text=lambda t: t.replace(
        '{"format": "pt"}', "[" * 50_000 + "]" * 50_000)),
    "tensor-nested-50000-deep": safetensors(text=lambda t: t.replace(
        '"shape": [4]', '"shape": ' + "[" * 50_000 + "]" * 50_000, 1)),
    "data-offsets-null": safetensors(_set("layers.0.bias.data_offsets", None)),
    "data-offsets-text": safetensors(_set("layers.0.bias.data_offsets", ["144", "160"])),
    "data-offsets-floats": safetensors(_set("layers.0.bias.data_offsets", [144.0, 160.0])),
    "data-offsets-one": safetensors(_set("layers.0.bias.data_offsets", [144])),
    "shape-1e400": safetensors(text=lambda t: t.replace('"shape": [4]', '"shape": [1e400]', 1)),
    "shape-huge-integer": safetensors(text=lambda t: t.replace(
        '"shape": [4]', '"shape": [' + "9" * 5000 + "]", 1)),
    "shape-null": safetensors(_set("layers.0.bias.shape", None)),
    "dtype-list": safetensors(_set("layers.0.bias.dtype", ["F32"])),
    "entry-not-a-table": safetensors(lambda h: h.__setitem__("layers.0.bias", [1, 2])),
    "header-a-list": b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
}

# files the worker's loader would refuse, though their sizes add up
RUN_TIME_BREAKERS: dict[str, bytes] = {
    "shape-16.0": safetensors(_set("layers.0.bias.shape", [4.0])),
    "metadata-not-text": safetensors(lambda h: h.__setitem__("__metadata__", {"format": 1})),
    "metadata-a-list": safetensors(lambda h: h.__setitem__("__metadata__", ["pt"])),
}


@pytest.mark.parametrize("what", sorted(HOSTILE_HEADERS) + sorted(RUN_TIME_BREAKERS))
def test_hostile_safetensors_header_is_422_naming_the_file(tenant: httpx.Client,
                                                           what: str) -> None:
    blob = {**HOSTILE_HEADERS, **RUN_TIME_BREAKERS}[what]
    before = upload_ids(tenant, "/v1/checkpoints")
    started = time.monotonic()
    r = tenant.post("/v1/checkpoints", files={"file": (f"{what}.safetensors", blob)},
                    data={"model": json.dumps(digits_cnn(4))})
    assert r.status_code == 422, f"{what}: {r.status_code} {r.text[:300]}"
    assert error_locs(r) == [["body", "file"]], r.text
    assert time.monotonic() - started < 5
    assert upload_ids(tenant, "/v1/checkpoints") == before


def test_valid_safetensors_is_accepted(tenant: httpx.Client) -> None:
    r = tenant.post("/v1/checkpoints", files={"file": ("ok.safetensors", safetensors())},
                    data={"model": json.dumps(digits_cnn(4))})
    assert r.status_code == 201, r.text


HOSTILE_MODELS = {
    "nested-100000-deep": '{"input_shape": [1, 8, 8], "layers": '
                          + "[" * 100_000 + "]" * 100_000 + "}",
    "5000-digit-integer": '{"input_shape": [1, 8, 8], "num_classes": ' + "7" * 5000
                          + ', "layers": [{"type": "flatten"}]}',
    "1e400": '{"input_shape": [1, 8, 1e400], "layers": [{"type": "flatten"}]}',
    "not-json": '{"input_shape": ',
}


@pytest.mark.parametrize("what", sorted(HOSTILE_MODELS))
def test_hostile_checkpoint_model_field_is_422_naming_model(tenant: httpx.Client,
                                                            what: str) -> None:
    started = time.monotonic()
    r = tenant.post("/v1/checkpoints", files={"file": ("c.safetensors", safetensors())},
                    data={"model": HOSTILE_MODELS[what]})
    assert r.status_code == 422, f"{what}: {r.status_code} {r.text[:300]}"
    assert error_locs(r)[0][:2] == ["body", "model"], r.text
    assert time.monotonic() - started < 5


# -- layer names in Unicode digits -------------------------------------------------------------

def feature_request(layers: list[str] | None) -> dict[str, Any]:
    return {"kind": "feature_maps", "source": {"model": digits_cnn(4), "seed": 0},
            "inputs": {"dataset": "digits", "indices": [0]}, "layers": layers,
            "png": False, "device": "cpu"}


@pytest.mark.parametrize("name", ["¹", "٣", "３", "²0"])
def test_unicode_digit_layer_name_is_422_at_submission(tenant: httpx.Client,
                                                       name: str) -> None:
    r = tenant.post("/v1/jobs", json=feature_request(["0", name]))
    assert r.status_code == 422, r.text
    assert error_locs(r) == [["body", "layers", 1]], r.text
    assert "unknown layer" in r.json()["detail"][0]["msg"]
    r = tenant.post("/v1/jobs", json=feature_request([name]))  # the exact body
    assert r.status_code == 422, r.text
    assert error_locs(r) == [["body", "layers", 0]], r.text


def test_unicode_digit_layer_name_in_the_url_is_404(tenant: httpx.Client) -> None:
    r = tenant.post("/v1/jobs", json=feature_request(None))
    assert r.status_code == 201, r.text
    job = wait_job(tenant, r.json()["id"], timeout=50)
    assert job["state"] == "succeeded", job
    url = f"/v1/jobs/{job['id']}/feature-maps"
    assert tenant.get(f"{url}/3").status_code == 200  # ASCII digits still name an index
    # "٣" used to be taken as layer 3; "%C2%B9" is "¹" as the issue sent it
    for name in ("¹", "٣", "３", "%C2%B9", "%D9%A3"):
        r = tenant.get(f"{url}/{name}")
        assert r.status_code == 404, f"{name}: {r.status_code} {r.text[:200]}"
        assert "not found" in r.json()["detail"]


# -- refused at submission, not at run time ---------------------------------------------------

@pytest.mark.parametrize("seed", [-5, -1, 2**32, 2**70])
def test_synthetic_dataset_seed_out_of_range_is_422(tenant: httpx.Client, seed: int) -> None:
    before = job_ids(tenant)
    body = train_request(1, model=digits_cnn(4, input_shape=(1, 8, 8), num_classes=4),
                         dataset={"name": "synthetic", "size": 8, "channels": 1,
                                  "num_classes": 4, "samples": 16, "seed": seed})
    r = tenant.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    # loc: body, the job kind's tag, dataset, the union member, seed
    assert ["body", "train", "dataset", "SyntheticRef", "seed"] in error_locs(r), r.text
    assert job_ids(tenant) == before


def test_synthetic_dataset_too_large_for_a_worker_is_422(tenant: httpx.Client) -> None:
    """200,000 samples of 16x512x512 would be 3.4 TB of float32: refused at submission
    (train and feature-map jobs), not a MemoryError in the worker."""
    before = job_ids(tenant)
    huge = {"name": "synthetic", "samples": 200_000, "size": 512, "channels": 16,
            "num_classes": 4}
    model = {"input_shape": [16, 512, 512], "num_classes": 4,
             "layers": [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"},
                        {"type": "linear", "out_features": 4}]}
    r = tenant.post("/v1/jobs", json=train_request(1, model=model, dataset=huge))
    assert r.status_code == 422, r.text
    assert error_locs(r) == [["body", "dataset", "samples"]], r.text
    assert "max_dataset_bytes=" in r.json()["detail"][0]["msg"]
    r = tenant.post("/v1/jobs", json={**feature_request(None), "source": {"model": model},
                                      "inputs": {"dataset": huge, "indices": [0]}})
    assert r.status_code == 422, r.text
    assert error_locs(r) == [["body", "inputs", "dataset", "samples"]], r.text
    assert job_ids(tenant) == before


def test_synthetic_dataset_with_a_valid_seed_trains(tenant: httpx.Client) -> None:
    body = train_request(1, model=digits_cnn(4, input_shape=(1, 8, 8), num_classes=4),
                         dataset={"name": "synthetic", "size": 8, "channels": 1,
                                  "num_classes": 4, "samples": 32, "seed": 5})
    r = tenant.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    assert wait_job(tenant, r.json()["id"], timeout=50)["state"] == "succeeded"


def test_zlib_bomb_ratio_sanity() -> None:
    """The weapon itself: deflate shrinks zeros about a thousandfold (so ~1 MB for 1 GiB)."""
    assert len(zlib.compress(bytes(1 << 20))) < 2048
