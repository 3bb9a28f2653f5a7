"""Each benchmark script runs end to end on tiny sizes (`--smoke`): it starts what it needs
(real API, worker, PostgreSQL, Redis), measures, and prints its figures. No timing asserts:
the figures belong in bench/RESULTS.md, not in pass/fail."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.services import ROOT

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
FIGURES = {
    "bench_trainer": [rf"ratio train/bare = {NUMBER}",
                      rf"other core busy: 1 thread +{NUMBER} images/s, 2 threads +{NUMBER}"],
    "bench_e2e": [rf"1-epoch digits job +e2e {NUMBER} s  bare loop {NUMBER} s",
                  rf"dataset load +{NUMBER}"],
    "bench_api": [rf"ratio API/bare = {NUMBER}", rf"POST /v1/jobs \(submissions\) +{NUMBER}"],
    "bench_submit": [rf"POST /v1/jobs \(1-epoch digits\): median {NUMBER} ms",
                     rf"db: lock \+ count \+ INSERT \+ commit +{NUMBER}",
                     rf"GET /v1/jobs/\{{id\}} \(a queued job\): median {NUMBER} ms"],
    "bench_dispatch": [rf"dispatch pg \(Redis\), 2 jobs, created_at -> started_at: p50 {NUMBER}"],
    "bench_first_job": [rf"warm-up off  first job +{NUMBER} s  next jobs +{NUMBER} s",
                        rf"warm-up on   first job +{NUMBER} s"],
    "bench_ddp": [rf"Convoy 2 ranks / Convoy 1 rank +{NUMBER}x",
                  rf"Convoy 2 ranks / bare torchrun 2 +{NUMBER}x"],
    "bench_metrics": [rf"postgresql +300 jobs  scrape +{NUMBER} ms",
                      rf"ratio timed/bare = {NUMBER}"],
    "bench_feature_maps": [rf"digits-cnn +256 +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} \({NUMBER}\)",
                           rf"vgg-small +64 +{NUMBER}",
                           rf"vgg-small x16, max pool 2, no png +{NUMBER}( +{NUMBER}){{8}}",
                           rf"x512 +bare +{NUMBER} +no-png job +{NUMBER} +ratio bare/job = "
                           rf"{NUMBER} +lazy-png job +{NUMBER} +ratio lazy/no-png = {NUMBER}",
                           rf"images/s x512 / x64 = {NUMBER}"],
    "bench_invariance": [rf"lenet5 +32 +480 +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} \({NUMBER}\)",
                         rf"(?m)^digits-cnn +32 +{NUMBER}( +{NUMBER}){{4}}$"],
    "bench_store": [rf"upload +seaweedfs +convoy +{NUMBER} MB/s +obstore +{NUMBER} MB/s +"
                    rf"ratio convoy/obstore = {NUMBER}",
                    rf"download +local folder +convoy +{NUMBER} MB/s",
                    rf"ratio obstore/boto3 up = {NUMBER} down = {NUMBER}",
                    rf"api download local +API +{NUMBER} MB/s +bare static +{NUMBER} MB/s +"
                    rf"ratio API/bare = {NUMBER}",
                    rf"api download seaweedfs +API +{NUMBER} MB/s"],
    "bench_scale": [rf"GET /v1/jobs/\{{id\}} +p50 +{NUMBER} +{NUMBER} +{NUMBER}x",
                    rf"reconciler pass +p50 +{NUMBER} +{NUMBER} +{NUMBER}x",
                    r"list page +Limit > .*ix_jobs_tenant_state_created"],
    "bench_ab": [rf"old: e2e +{NUMBER} ms  bare loop +{NUMBER} ms  median ratio +{NUMBER}x",
                 rf"new: e2e +{NUMBER} ms  bare loop +{NUMBER} ms  median ratio +{NUMBER}x"],
    "bench_scenes": [rf"resnet-small +augment=yes +val_accuracy={NUMBER}",
                     rf"residual - plain \(augment=yes\): [+-]{NUMBER}"],
}


@pytest.fixture(scope="module")
def smoke_runs() -> Iterator[dict[str, tuple[subprocess.Popen, object]]]:
    """All of them at once: most of their time is waiting for processes to start and jobs to
    finish, so running them side by side keeps this module well under a minute."""
    runs = {}
    for script in FIGURES:
        out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{script}", "--smoke"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        runs[script] = (proc, out)
    yield runs
    for proc, out in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


@pytest.mark.parametrize("script", list(FIGURES))
def test_benchmark_script_runs_and_prints_its_figures(
        smoke_runs: dict[str, tuple[subprocess.Popen, object]], script: str) -> None:
    proc, out = smoke_runs[script]
    rc = proc.wait(timeout=240)
    out.seek(0)
    text = out.read()
    assert rc == 0, f"{script} exited {rc}:\n{text[-4000:]}"
    for pattern in FIGURES[script]:
        assert re.search(pattern, text), f"{script}: no match for {pattern!r} in\n{text}"
