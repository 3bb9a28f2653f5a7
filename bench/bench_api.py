"""The API under load on loopback: 64 concurrent keep-alive clients polling GET /v1/jobs/{id}
(polls/s, p50/p99 latency) over a bare FastAPI app doing the same primary-key read on the
same database with the same server settings (ABAB windows, medians); then job submissions/s.
The load generator (asyncio, raw HTTP/1.1) shares the machine's cores with the server.

    python -m bench.bench_api [--mode pg|embedded] [--clients 64] [--seconds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

from bench.bench_e2e import job_request
from bench.common import machine, median, percentile
from bench.stacks import service
from tests.services import TOKEN, Stack, free_port


async def _client(port: int, request: bytes, stop_at: float, lat: list[float],
                  errors: list[int], expect: int, interval: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if interval:  # spread the paced clients over one interval
        await asyncio.sleep(random.uniform(0, interval))
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status != expect:
                errors.append(status)
            lat.append(time.perf_counter() - t0)
            if interval:
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: its CPU cost, which other load on the box barely moves."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, request: bytes, *, clients: int, seconds: float, expect: int = 200,
         pid: int | None = None, interval: float = 0.0) -> dict[str, float]:
    """`clients` keep-alive connections; each sends its next request as soon as the last
    answer arrives (closed loop: the server's capacity), or every `interval` seconds (paced:
    the latency a polling client sees at a load the server can carry)."""
    lat: list[float] = []
    errors: list[int] = []

    async def go() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, request, stop_at, lat, errors, expect, interval)
                               for _ in range(clients)))

    t0, c0 = time.perf_counter(), cpu_seconds(pid) if pid else 0.0
    asyncio.run(go())
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - c0 if pid else float("nan")
    if errors:
        raise RuntimeError(f"{len(errors)} responses were not {expect}: {sorted(set(errors))}")
    return {"rps": len(lat) / elapsed, "p50": percentile(lat, 50) * 1e3,
            "p99": percentile(lat, 99) * 1e3, "n": len(lat),
            "cpu_ms": cpu / max(1, len(lat)) * 1e3}


def http_get(path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def http_post(path: str, body: dict, token: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


def show(label: str, r: dict[str, float]) -> None:
    print(f"  {label:34s} {r['rps']:8.0f} req/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms"
          f"  server CPU {r['cpu_ms']:.2f} ms/request  ({r['n']:.0f} requests)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", default="pg", choices=["pg", "embedded"])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.5, help="paced clients' poll interval")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.clients, args.seconds, args.rounds = 4, 0.5, 1
    try:
        import uvloop

        uvloop.install()  # a cheaper load generator leaves more CPU to the servers
    except ImportError:
        pass
    print(machine())
    # No worker: submitted jobs stay queued. The reconciler would re-send thousands of them
    # during the submission test, so it waits an hour here; the queue cap is lifted too.
    with service(args.mode, workers=0, CONVOY_REQUEUE_AFTER_SECONDS="3600",
                 CONVOY_MAX_QUEUED_PER_TENANT="1000000") as stack:
        with stack.client() as c:
            job_id = c.post("/v1/jobs", json=job_request(1)).json()["id"]
        bare_home = Path(stack.home) / "bare"
        bare_home.mkdir()
        bare = Stack(env=stack.env, home=bare_home)
        bare.port = free_port()
        bare.start_api([sys.executable, "-m", "bench.bare_app", str(bare.port)])
        try:
            path = f"/v1/jobs/{job_id}"
            api_req, bare_req = http_get(path, TOKEN), http_get(path, None)
            load(stack.port, api_req, clients=args.clients, seconds=min(1.0, args.seconds))
            load(bare.port, bare_req, clients=args.clients, seconds=min(1.0, args.seconds))
            api_runs, bare_runs = [], []
            for _ in range(args.rounds):  # ABAB windows
                api_runs.append(load(stack.port, api_req, clients=args.clients,
                                     seconds=args.seconds, pid=stack.api.pid))
                bare_runs.append(load(bare.port, bare_req, clients=args.clients,
                                      seconds=args.seconds, pid=bare.api.pid))
        finally:
            bare.stop()
        a = {k: median([r[k] for r in api_runs]) for k in api_runs[0]}
        b = {k: median([r[k] for r in bare_runs]) for k in bare_runs[0]}
        print(f"GET /v1/jobs/{{id}}, {args.clients} concurrent keep-alive clients, "
              f"{args.rounds} x {args.seconds:g} s windows, mode={args.mode} (medians)")
        show("bare FastAPI, same PK read", b)
        show("Convoy API (auth + read + schema)", a)
        print(f"  ratio API/bare = {a['rps'] / b['rps']:.3f}  (goal >= 0.8), API p99 "
              f"{a['p99']:.1f} ms (goal < 50 ms); by server CPU per request "
              f"{b['cpu_ms'] / a['cpu_ms']:.3f}")
        paced = load(stack.port, api_req, clients=args.clients, seconds=max(args.seconds, 2),
                     pid=stack.api.pid, interval=args.interval)
        show(f"API, paced: each client every {args.interval:g} s", paced)
        sub = load(stack.port, http_post("/v1/jobs", job_request(1), TOKEN),
                   clients=args.clients, seconds=args.seconds, expect=201, pid=stack.api.pid)
        show("POST /v1/jobs (submissions)", sub)


if __name__ == "__main__":
    main()
