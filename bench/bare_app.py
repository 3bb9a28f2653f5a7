"""The baseline for bench_api: a bare FastAPI app doing the same primary-key read of a job
on the same database, returning the same columns, no auth. Served like `convoy api`."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException

from convoy.settings import get_settings
from db.session import get_sessionmaker
from db.tables import Job

settings = get_settings()
app = FastAPI()
COLUMNS = ("id", "kind", "name", "state", "progress", "attempt", "max_attempts", "error",
           "created_at", "started_at", "finished_at", "updated_at", "summary", "result", "request")


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/jobs/{job_id}")
def get_job(job_id: str) -> dict:
    with get_sessionmaker(settings.database_url)() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, "not found")
        return {c: getattr(job, c) for c in COLUMNS}


if __name__ == "__main__":
    import sys

    import uvicorn

    # the same server settings as `convoy api` (cli/main.py cmd_api)
    uvicorn.run("bench.bare_app:app", host="127.0.0.1", port=int(sys.argv[1]), workers=1,
                log_level="info")
