"""Limits on what a request may ask for: each refused with 422 naming the limit (and the
field), bodies past the size cap with 413, the wrong content type with 415; nothing is
written for a refused request."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from tests.factories import digits_cnn, train_request


def refused(client, body, status=422):  # type: ignore[no-untyped-def]
    before = client.get("/v1/jobs", params={"limit": 200}).json()["items"]
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    after = client.get("/v1/jobs", params={"limit": 200}).json()["items"]
    assert [j["id"] for j in after] == [j["id"] for j in before], "a refused job was written"
    return r.json()["detail"]


def conv(channels: int) -> dict:
    return {"type": "conv2d", "out_channels": channels, "kernel_size": 3, "padding": 1}


LIMITS = [
    pytest.param(train_request(1001), ["body", "train", "epochs"], "max_epochs=1000",
                 id="epochs"),
    pytest.param(train_request(1, batch_size=4097), ["body", "train", "batch_size"],
                 "max_batch_size=4096", id="batch_size"),
    pytest.param(train_request(1, model={
        "input_shape": [1, 8, 8], "num_classes": 10,
        "layers": [conv(4096), conv(4096), {"type": "flatten"}, {"type": "linear",
                                                                 "out_features": 10}]}),
                 ["body", "model"], "max_params=50000000", id="params"),
    pytest.param(train_request(1, batch_size=256, model=digits_cnn(64, input_shape=(3, 512, 512),
                                                                  num_classes=4),
                               dataset={"name": "synthetic", "size": 512, "num_classes": 4}),
                 ["body", "model"], "max_activation_bytes=", id="activation_memory"),
    pytest.param(train_request(1, model=digits_cnn(4, input_shape=(1, 2048, 2048))),
                 ["body", "model", "input_shape"], "max_input_side=1024", id="image_size"),
]


@pytest.mark.parametrize(("body", "loc", "limit"), LIMITS)
def test_each_limit_is_422_naming_the_limit_and_the_field(client, body, loc, limit):
    [error] = refused(client, body)
    assert error["loc"] == loc, error
    assert limit in error["msg"], error


def test_body_past_the_request_cap_is_413_declared_or_streamed(client):
    big = train_request(1) | {"name": "x" * 100, "pad": "y" * (1024 * 1024 + 1)}
    r = client.post("/v1/jobs", json=big)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while reading
        yield b'{"kind": "train", "name": "'
        for _ in range(64):
            yield b"z" * 32768
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_upload_declaring_more_than_the_upload_cap_is_413_before_any_byte_is_read(client):
    url = urlparse(str(client.base_url))
    auth = client.headers["authorization"]
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: {url.hostname}\r\n"
                   f"Authorization: {auth}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                   f"Content-Length: {10 * 1024**3}\r\n\r\n").encode())
        reply = s.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]


def test_wrong_content_type_is_415(client):
    r = client.post("/v1/jobs", content=b"kind=train", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/v1/datasets", json={"x": [1]})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
