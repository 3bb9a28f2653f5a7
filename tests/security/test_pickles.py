"""No upload can run code: pickles posing as datasets (.npz), inputs (.npy) and checkpoints
(.safetensors, a torch zip) are refused, and the file their unpickling would create never
appears. Plus a source check: nothing outside tests calls a pickle-based loader."""

from __future__ import annotations

import io
import json
import pickle
import re
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.factories import digits_cnn, npy_bytes, npz_bytes
from tests.services import ROOT, Stack


class Pwn:
    """Unpickling this calls open(path, "w"): the marker file appears iff anyone unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def evil_files(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps(Pwn(marker), protocol=2)
    obj = np.empty(4, dtype=object)
    obj[:] = [Pwn(marker)] * 4
    npy, npz = npy_bytes(obj), npz_bytes(x=obj, y=np.arange(4))
    torch_zip = io.BytesIO()
    with zipfile.ZipFile(torch_zip, "w") as z:  # the layout torch.save writes
        z.writestr("archive/data.pkl", pickle.dumps({"w": Pwn(marker)}, protocol=2))
        z.writestr("archive/version", "3\n")
    return {"pickle": raw, "pickle-p5": pickle.dumps(Pwn(marker), protocol=5),
            "npy-object": npy, "npz-object": npz,
            "torch-zip": torch_zip.getvalue()}


@pytest.fixture(scope="module")
def marker(stack: Stack) -> Path:
    path = stack.home / f"pwned-{uuid.uuid4().hex}"
    # Sanity check of the weapon itself: a real unpickle does create the marker.
    probe = path.with_suffix(".probe")
    pickle.loads(pickle.dumps(Pwn(probe)))  # noqa: S301 - that is the point
    assert probe.exists()
    probe.unlink()
    return path


def test_pickles_posing_as_uploads_are_refused(stack: Stack, tenant_a: httpx.Client,
                                               marker: Path) -> None:
    paths = set(tenant_a.get("/openapi.json").json()["paths"])
    files = evil_files(marker)
    targets: list[tuple[str, str, dict[str, str]]] = [("/v1/datasets", ".npz", {})]
    if "/v1/inputs" in paths:
        targets.append(("/v1/inputs", ".npy", {}))
    if "/v1/checkpoints" in paths:
        targets.append(("/v1/checkpoints", ".safetensors", {"model": json.dumps(digits_cnn(4))}))
        targets.append(("/v1/checkpoints", ".pt", {"model": json.dumps(digits_cnn(4))}))
    before = {u for p in ("/v1/datasets",) for u in (d["id"] for d in tenant_a.get(p).json())}
    failures = []
    for url, suffix, form in targets:
        for what, blob in files.items():
            r = tenant_a.post(url, files={"file": (f"{what}{suffix}", blob)}, data=form)
            if r.status_code not in (415, 422):
                failures.append(f"{url} {what}{suffix}: {r.status_code} {r.text[:120]}")
    assert not failures, "\n".join(failures)
    assert not marker.exists(), "an upload was unpickled"
    after = {d["id"] for d in tenant_a.get("/v1/datasets").json()}
    assert after == before, "a refused upload left a row behind"


def test_refused_uploads_leave_no_files(stack: Stack, tenant_a: httpx.Client,
                                        marker: Path) -> None:
    uploads = stack.home / "artifacts" / "uploads"
    count = sum(1 for _ in uploads.rglob("*")) if uploads.exists() else 0
    r = tenant_a.post("/v1/datasets", files={"file": ("x.npz", evil_files(marker)["pickle"])})
    assert r.status_code == 422
    assert (sum(1 for _ in uploads.rglob("*")) if uploads.exists() else 0) == count


FORBIDDEN = [
    (r"\btorch\.load\s*\(", "torch.load unpickles"),
    (r"\bpickle\.loads?\s*\(", "pickle.load"),
    (r"\b(c?[Pp]ickle|dill|joblib|cloudpickle)\.Unpickler\b", "an Unpickler"),
    (r"\ballow_pickle\s*=\s*True", "allow_pickle=True"),
    (r"\bjoblib\.load\s*\(", "joblib.load unpickles"),
    (r"\b(dill|cloudpickle)\.loads?\s*\(", "dill/cloudpickle"),
    (r"\byaml\.load\s*\((?![^)]*SafeLoader)", "yaml.load without SafeLoader"),
    (r"accept_content\s*=\s*\[[^\]]*pickle", "Celery accepting pickle"),
    (r"\b(task|result)_serializer\s*=\s*['\"]pickle", "Celery pickle serializer"),
]


NP_LOAD = re.compile(r"\b(np|numpy)\.load\s*\(")


def np_loads_without_allow_pickle_false(text: str) -> list[int]:
    """Offsets of np.load(...) calls whose own arguments lack allow_pickle=False (numpy's
    default has been False since 1.16.3, but the code must not depend on a default)."""
    found = []
    for m in NP_LOAD.finditer(text):
        depth, end = 1, m.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        if not re.search(r"allow_pickle\s*=\s*False", text[m.end():end]):
            found.append(m.start())
    return found


def problems(text: str) -> list[tuple[int, str]]:
    hits = [(m.start(), why) for pattern, why in FORBIDDEN for m in re.finditer(pattern, text)]
    return hits + [(at, "np.load without allow_pickle=False")
                   for at in np_loads_without_allow_pickle_false(text)]


def source_files() -> list[Path]:
    skip = {"tests", ".venv", "venv", ".git", "node_modules", "build", "dist", "var"}
    return [p for p in ROOT.rglob("*.py")
            if not skip.intersection(p.relative_to(ROOT).parts)]


def test_no_pickle_loaders_in_the_source_tree() -> None:
    files = source_files()
    assert any(p.name == "checkpoints.py" for p in files) and len(files) > 20
    hits = []
    for path in files:
        text = path.read_text(errors="replace")
        for at, why in problems(text):
            hits.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, at) + 1}: {why}")
    assert not hits, "\n".join(hits)


def test_the_source_check_would_catch_one() -> None:
    bad = ("import torch\nstate = torch.load(path)\nx = np.load(open(f), mmap_mode='r')\n"
           "y = pickle.loads(b)\nz = numpy.load(f, allow_pickle=True)\n")
    found = {why for _, why in problems(bad)}
    assert found == {"torch.load unpickles", "pickle.load", "allow_pickle=True",
                     "np.load without allow_pickle=False"}
    assert problems("with np.load(io.BytesIO(d),\n             allow_pickle=False) as a:") == []
