"""Embedded mode as a user meets it: `convoy run` with no servers and no token set, a digits
job through it, Ctrl-C, and a second start on the same CONVOY_HOME."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.checks import digits_val_accuracy
from tests.factories import train_request
from tests.services import ROOT, free_port, wait_http, wait_job

EPOCHS = 6


class Embedded:
    """`python -m cli.main run` in its own session, as a terminal's foreground group."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVOY_")}
        env.update({"CONVOY_HOME": str(home), "CONVOY_PORT": str(port),
                    "PYTHONUNBUFFERED": "1"})
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run"], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output(), re.MULTILINE):
                return m
            assert self.proc.poll() is None, f"convoy run exited:\n{self.output()[-3000:]}"
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in output:\n{self.output()[-3000:]}")

    def worker_pid(self) -> int:
        """The Celery worker: the child of `convoy run` that runs celery."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"celery" in cmdline:
                return int(entry.name)
        raise AssertionError("no celery worker child found")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):  # exited, waiting to be reaped by whoever adopted it
            return True
        time.sleep(0.1)
    return False


def start(home: Path, port: int, log: Path) -> tuple[Embedded, str, int]:
    emb = Embedded(home, port, log)
    try:
        url = emb.wait_for(r"^Convoy \(embedded\) at (\S+)").group(1)
        token = emb.wait_for(r"^Token: (\S+)").group(1)
        assert url == f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc=emb.proc)
        emb.wait_for(r"worker@\S+ ready\.")
    except BaseException:
        emb.stop()
        raise
    return emb, token, emb.worker_pid()


def test_convoy_run_trains_digits_stops_on_ctrl_c_and_restarts_with_its_data(tmp_path):
    home, port = tmp_path / "home", free_port()
    emb, token, worker = start(home, port, tmp_path / "run1.log")
    try:
        assert token.startswith("cvy_")
        assert "shown once" in emb.output()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            request = train_request(EPOCHS, batch_size=32)
            r = client.post("/v1/jobs", json=request)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            done = wait_job(client, job_id, timeout=240)
            assert done["state"] == "succeeded", done["error"]
            assert done["result"]["val_accuracy"] > 0.9

            series = client.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
            for name in ("train_loss", "val_loss", "val_accuracy"):
                assert [p["epoch"] for p in series[name]] == list(range(1, EPOCHS + 1))

            blob = client.get(f"/v1/jobs/{job_id}/checkpoints/epoch-{EPOCHS:04d}.safetensors")
            assert blob.status_code == 200
            acc = digits_val_accuracy(blob.content, request["model"])
            assert acc == done["result"]["val_accuracy"]

        # CONVOY_HOME holds everything: the database, the broker and the artifacts.
        assert (home / "convoy.db").is_file() and (home / "broker.db").is_file()
        assert list((home / "artifacts").rglob("epoch-0006.safetensors"))

        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        os.killpg(emb.proc.pid, signal.SIGINT)
        assert emb.proc.wait(timeout=30) == 0, emb.output()[-3000:]
        assert gone(worker, timeout=5), "the celery worker outlived convoy run"
    finally:
        emb.stop()

    emb, again, worker = start(home, port, tmp_path / "run2.log")
    try:
        # the secret is shown once, on the first start; later starts say where it is saved
        assert again == "saved" and token not in emb.output()
        assert (home / "admin-token").read_text().strip() == token
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            listed = client.get("/v1/jobs").json()["items"]
            assert [(j["id"], j["state"]) for j in listed] == [(job_id, "succeeded")]
            # a 2-device CPU job: the embedded worker owns the host's cores (2 on a laptop)
            r = client.post("/v1/jobs", json={**train_request(1, batch_size=32),
                                              "resources": {"devices": 2}})
            assert r.status_code == 201, r.text
            two = wait_job(client, r.json()["id"], timeout=240)
            assert two["state"] == "succeeded", two["error"]
            assert two["result"]["world_size"] == 2
        # `convoy run` killed outright (no chance to clean up): its worker must not linger.
        emb.proc.kill()
        emb.proc.wait(timeout=10)
        assert gone(worker, timeout=30), "the celery worker outlived a killed convoy run"
    finally:
        emb.stop()
