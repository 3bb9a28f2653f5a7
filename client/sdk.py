"""The Python client: one httpx connection to a Convoy server, typed results, and the job's
event stream (server-sent events, resumed with Last-Event-ID when the connection drops)."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from client.types import Checkpoint, Event, FeatureMapLayer, Job, MetricPoint


class ConvoyError(RuntimeError):
    """The server said no: the status and its `detail`."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {_detail_text(detail)}")


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}"
                         for e in detail if isinstance(e, dict))
    return str(detail)


class Convoy:
    """`Convoy(url, token)`; both default to CONVOY_URL and CONVOY_TOKEN."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 30.0, retries: int = 5, retry_backoff: float = 0.5) -> None:
        # A submission is retried (same Idempotency-Key) after a connection error or a 5xx,
        # `retries` times, waiting retry_backoff, then twice as long each time (at most 10 s).
        self.retries, self.retry_backoff = retries, retry_backoff
        self.url = (url or os.environ.get("CONVOY_URL") or "http://127.0.0.1:8000").rstrip("/")
        token = token or os.environ.get("CONVOY_TOKEN")
        if not token:
            raise ValueError("no token: pass token= or set CONVOY_TOKEN")
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def __enter__(self) -> Convoy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self._checked(self.http.request(method, path, **kw))

    def _post_idempotent(self, path: str, *, idempotency_key: str | None = None,
                         **kw: Any) -> httpx.Response:
        """POST with an Idempotency-Key: one fresh key per logical request, sent again with
        every retry, so a retry after a lost answer (connection reset, API restarted, 5xx)
        gets the resource the first try created instead of a duplicate."""
        key = idempotency_key or uuid.uuid4().hex
        headers = {**kw.pop("headers", {}), "Idempotency-Key": key}
        delay = self.retry_backoff
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self.http.request("POST", path, headers=headers, **kw)
            except httpx.TransportError:
                if last:
                    raise
                wait = delay
            else:
                if r.status_code < 500 or last:
                    return self._checked(r)
                wait = _retry_after(r, delay)
            time.sleep(wait)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _checked(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ConvoyError(r.status_code, detail)
        return r

    # ---- sweeps (issue 20) ----------------------------------------------------------------

    def submit_sweep(self, request: dict[str, Any], *, idempotency_key: str | None = None
                     ) -> dict[str, Any]:
        """POST /v1/sweeps, retried with one Idempotency-Key: never two sweeps."""
        return dict(self._post_idempotent("/v1/sweeps", json=request,
                                          idempotency_key=idempotency_key).json())

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/sweeps/{sweep_id}").json())

    def sweeps(self, *, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/sweeps", params={"limit": limit}).json()["items"])

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sweeps/{sweep_id}/cancel").json())

    def wait_sweep(self, sweep_id: str, *, on_poll: Callable[[dict[str, Any]], None] | None
                   = None, every_s: float = 1.0) -> dict[str, Any]:
        """Poll until the sweep has ended; `on_poll` sees each answer."""
        while True:
            sweep = self.sweep(sweep_id)
            if on_poll is not None:
                on_poll(sweep)
            if sweep["state"] != "running":
                return sweep
            time.sleep(every_s)

    # ---- jobs ---------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], *, idempotency_key: str | None = None,
               wait_seconds: float | None = None) -> Job:
        """Submit a job; retried with one Idempotency-Key (a fresh one unless given), so it
        is created at most once however often the answer is lost. With `wait_seconds` (at
        most 60; `Prefer: wait`), answered when the job has ended, or after that long with
        the job as it is then: a short job in one request."""
        kw: dict[str, Any] = {}
        if wait_seconds:
            kw = {"headers": {"Prefer": f"wait={wait_seconds:g}"},
                  "timeout": httpx.Timeout(30.0, read=wait_seconds + 30.0)}
        return Job.from_json(self._post_idempotent("/v1/jobs", json=request,
                                                   idempotency_key=idempotency_key, **kw).json())

    def get(self, job_id: str, *, wait_seconds: float | None = None) -> Job:
        """The job; with `wait_seconds` (at most 60), a long poll: answered as soon as the job
        has ended, or after that long with the job as it is then."""
        params = {"wait_seconds": wait_seconds} if wait_seconds else None
        return Job.from_json(self._call("GET", f"/v1/jobs/{job_id}", params=params).json())

    def jobs(self, *, state: str | None = None, kind: str | None = None,
             limit: int = 50) -> list[Job]:
        params = {k: v for k, v in {"state": state, "kind": kind, "limit": limit}.items() if v}
        return [Job.from_json(j) for j in
                self._call("GET", "/v1/jobs", params=params).json()["items"]]

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Each attempt: worker_id, device, started_at, ended_at, outcome, error."""
        return self._call("GET", f"/v1/jobs/{job_id}/attempts").json()

    def workers(self) -> list[dict[str, Any]]:
        """The live workers (admin token)."""
        return self._call("GET", "/v1/workers").json()

    def logs(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/logs").json()

    def metrics(self, job_id: str, name: str | None = None) -> dict[str, list[MetricPoint]]:
        params = {"name": name} if name else {}
        series = self._call("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()["series"]
        return {k: [MetricPoint(p["step"], p["epoch"], p["value"]) for p in v]
                for k, v in series.items()}

    def events(self, job_id: str, *, last_event_id: str | None = None,
               reconnect: bool = True) -> Iterator[Event]:
        """The job's events until it ends. A dropped connection is resumed where it broke."""
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ConvoyError(r.status_code, r.json().get("detail", r.text))
                    for event in parse_sse(r.iter_lines()):
                        last_event_id = event.id or last_event_id
                        yield event
                        if event.type == "state" and event.data.get("state") in (
                                "succeeded", "failed", "canceled"):
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if not reconnect:
                    raise
            if not reconnect:
                return
            time.sleep(1.0)

    def wait(self, job_id: str, *, on_event: Callable[[Event], None] | None = None,
             timeout: float | None = None) -> Job:
        """Follow the job's events until it ends; returns the final job. Without `on_event`,
        long polls of the job instead (each answered the moment the job ends)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if on_event is None:
            while True:
                left = 20.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} not done after {timeout}s")
                # under the client's 30 s read timeout
                job = self.get(job_id, wait_seconds=min(20.0, max(left, 0.01)))
                if job.state in ("succeeded", "failed", "canceled"):
                    return job
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout}s")
        return self.get(job_id)

    # ---- artifacts ----------------------------------------------------------------------

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return [Checkpoint(c["name"], c.get("epoch"), c["size"], c["sha256"])
                for c in self._call("GET", f"/v1/jobs/{job_id}/checkpoints").json()]

    def download_checkpoint(self, job_id: str, name: str = "last",
                            out: str | Path | None = None) -> Path:
        """Writes the checkpoint (`last` or a name) to `out` (a file or a folder)."""
        r = self._call("GET", f"/v1/jobs/{job_id}/checkpoints/{name}")
        real = r.headers.get("x-checkpoint-name") or name
        path = Path(out) if out else Path(real)
        if path.is_dir():
            path = path / real
        _write(path, r.content)
        return path

    def feature_maps(self, job_id: str) -> list[FeatureMapLayer]:
        data = self._call("GET", f"/v1/jobs/{job_id}/feature-maps").json()
        return [FeatureMapLayer.from_json(layer) for layer in data.get("layers", [])]

    def feature_map(self, job_id: str, layer: str, *, format: str = "npy",
                    image: int | None = None) -> bytes:
        params: dict[str, Any] = {"format": format}
        if image is not None:
            params["image"] = image
        return self._call("GET", f"/v1/jobs/{job_id}/feature-maps/{layer}", params=params).content

    def invariance(self, job_id: str) -> dict[str, Any]:
        """An invariance job's curves: {"state", "layers": [{"name", "index", "type",
        "curves": {family: [{"magnitude", "cosine", "distance"}]}}], "output", ...}."""
        data: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/invariance").json()
        return data

    # ---- a model's life after training ----------------------------------------------------

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its files (409 while it is queued or running)."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def delete_upload(self, upload_id: str) -> None:
        """Delete an uploaded dataset, checkpoint or input (409 while a job uses it)."""
        self._call("DELETE", f"/v1/uploads/{upload_id}")

    def usage(self) -> dict[str, Any]:
        """The tenant's stored bytes and counts, and its limit (limit_bytes, or None)."""
        data: dict[str, Any] = self._call("GET", "/v1/usage").json()
        return data

    def upload_inputs(self, path: str | Path) -> dict[str, Any]:
        """Upload a .npy (N, C, H, W) or a PNG/JPEG as inputs; returns the upload."""
        p = Path(path)
        r = self._post_idempotent("/v1/inputs", files={"file": (p.name, p.read_bytes())})
        data: dict[str, Any] = r.json()
        return data

    def predictions(self, job_id: str, *, offset: int = 0, limit: int = 100
                    ) -> dict[str, Any]:
        """A page of an evaluate job's predictions: {"total", "items": [{"index", "label",
        "top": [{"class", "probability"}]}], "next_offset"}."""
        data: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/predictions",
                                          params={"offset": offset, "limit": limit}).json()
        return data

    def download_export(self, job_id: str, out: str | Path) -> Path:
        """An export job's file (model.onnx or model.pt) to `out` (a file or a folder)."""
        r = self._call("GET", f"/v1/jobs/{job_id}/export")
        path = Path(out)
        if path.is_dir():
            path = path / (job_id + (".onnx" if r.content[:1] != b"PK" else ".pt"))
        _write(path, r.content)
        return path

    def download_feature_maps(self, job_id: str, out: str | Path, *,
                              png: bool = True) -> list[Path]:
        """Every layer's .npy (and, for spatial layers, a PNG grid per input image) into
        folder `out`, with the layer list as layers.json."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        layers = self.feature_maps(job_id)
        for layer in layers:
            path = folder / f"{_safe(layer.name)}.npy"
            _write(path, self.feature_map(job_id, layer.name, format="npy"))
            written.append(path)
            # the server draws PNG grids for spatial maps [N, C, H, W] only
            for k in range(layer.shape[0] if (png and len(layer.shape) == 4) else 0):
                path = folder / f"{_safe(layer.name)}-{k}.png"
                _write(path, self.feature_map(job_id, layer.name, format="png", image=k))
                written.append(path)
        index = folder / "layers.json"
        index.write_text(json.dumps([layer.raw for layer in layers], indent=2))
        return [*written, index]


# Retry-After in seconds, in ASCII digits (float() also reads "٣", "nan", "inf" and "1_0");
# an HTTP-date or anything else means the caller's own delay
_SECONDS = re.compile(r"-?[0-9]{1,9}(\.[0-9]{1,9})?")


def _retry_after(r: httpx.Response, default: float) -> float:
    raw = r.headers.get("retry-after", "").strip()
    if not _SECONDS.fullmatch(raw):
        return default
    return min(max(float(raw), 0.0), 10.0)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from text lines (comments skipped, multi-line data joined)."""
    event_type, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Event(event_type, event_id, json.loads("\n".join(data)))
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(blob)
    tmp.replace(path)
