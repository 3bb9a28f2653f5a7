"""The client half of the `convoy` command: submit (with a live progress bar), jobs, status,
cancel, logs, fetch, feature-maps, invariance, predict. cli.main adds these to its parser."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from client.sdk import Convoy, ConvoyError
from client.types import Event, Job

# Exit codes: a script can tell a failed job from a canceled one and from a refused request.
EXIT_FAILED, EXIT_ERROR, EXIT_CANCELED = 1, 2, 3

# Numbers on the command line in ASCII digits: int() and float() also read "٣" (Arabic-Indic
# three) and "３" (fullwidth) as 3, and float() reads "nan" and "inf"
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def ascii_int(text: str) -> int:
    """argparse type: a whole number written in ASCII digits."""
    if not _INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number in ASCII digits")
    return int(text)


def ascii_float(text: str) -> float:
    """argparse type: a finite decimal number written in ASCII digits."""
    value = float(text) if _FLOAT.fullmatch(text.strip()) else math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a finite number in ASCII "
                                         "digits")
    return value


class ProgressBar:
    """One line redrawn in place on a terminal; one line per epoch when piped to a file."""

    def __init__(self, out: TextIO, epochs: int | None) -> None:
        self.out, self.epochs = out, epochs
        self.tty = out.isatty()
        self.state, self.progress, self.epoch = "queued", 0.0, 0
        self.loss: float | None = None
        self.acc: float | None = None

    def update(self, event: Event) -> None:
        data = event.data
        if event.type == "state":
            self.state = data["state"]
        elif event.type == "progress":
            self.progress = float(data["progress"])
        elif event.type == "metric":
            values = data.get("values", {})
            self.epoch = int(data.get("epoch", self.epoch))
            self.loss = values.get("train_loss", self.loss)
            self.acc = values.get("val_accuracy", self.acc)
        if self.tty:
            self.out.write("\r" + self.line() + "\x1b[K")
            self.out.flush()
        elif event.type in ("state", "metric"):
            self.out.write(self.line() + "\n")
            self.out.flush()

    def line(self) -> str:
        width = 24
        filled = int(round(self.progress * width))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {100 * self.progress:3.0f}%",
                 self.state]
        if self.epoch:
            parts.append(f"epoch {self.epoch}" + (f"/{self.epochs}" if self.epochs else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.acc is not None:
            parts.append(f"val_acc {100 * self.acc:.1f}%")
        return "  ".join(parts)

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def final_line(job: Job, seconds: float) -> str:
    if job.state == "succeeded":
        result = job.result or {}
        bits = [f"{k} {result[k]:.4f}" for k in ("val_accuracy", "val_loss") if
                isinstance(result.get(k), int | float)]
        if "epochs_done" in result:
            bits.append(f"{result['epochs_done']} epochs")
        return f"job {job.id} succeeded in {seconds:.1f}s" + (f": {', '.join(bits)}"
                                                              if bits else "")
    if job.state == "failed":
        return f"job {job.id} failed: {job.error or 'no error message'}"
    return f"job {job.id} {job.state}"


def exit_code(job: Job) -> int:
    return {"succeeded": 0, "canceled": EXIT_CANCELED}.get(job.state, EXIT_FAILED)


def _client(args: argparse.Namespace) -> Convoy:
    return Convoy(args.url, args.token)


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        request: dict[str, Any] = json.loads(Path(args.spec).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.name is not None:
        request["name"] = args.name
    if args.epochs is not None:
        request.setdefault("train", {})["epochs"] = args.epochs
    if args.device is not None:
        request["device"] = args.device
    if args.devices is not None:
        request.setdefault("resources", {})["devices"] = args.devices
    if args.priority is not None:
        request["priority"] = args.priority
    with _client(args) as convoy:
        started = time.monotonic()
        # retried with one Idempotency-Key after a connection error or a 5xx: never two jobs
        job = convoy.submit(request, idempotency_key=args.idempotency_key)
        print(f"submitted {job.kind} job {job.id} ({job.state})", flush=True)
        if not args.wait:
            return 0
        epochs = (request.get("train") or {}).get("epochs") if job.kind == "train" else None
        bar = ProgressBar(sys.stderr, epochs)
        try:
            job = convoy.wait(job.id, on_event=bar.update)
        finally:
            bar.close()
        print(final_line(job, time.monotonic() - started), flush=True)
        return exit_code(job)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        jobs = convoy.jobs(state=args.state, kind=args.kind, limit=args.limit)
    print(f"{'ID':<32}  {'KIND':<12} {'STATE':<10} {'PROG':>5} {'VAL_ACC':>8}  NAME")
    for j in jobs:
        acc = (j.result or {}).get("val_accuracy")
        acc_text = f"{100 * acc:.1f}%" if isinstance(acc, int | float) else "-"
        print(f"{j.id:<32}  {j.kind:<12} {j.state:<10} {100 * j.progress:4.0f}% {acc_text:>8}"
              f"  {j.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        job = convoy.get(args.id)
    print(f"id        {job.id}\nkind      {job.kind}\nname      {job.name}\nstate     {job.state}"
          f"\nprogress  {100 * job.progress:.0f}%\nattempt   {job.attempt}\ncreated   "
          f"{job.created_at}\nstarted   {job.started_at or '-'}\nfinished  "
          f"{job.finished_at or '-'}")
    if job.waiting_reason:
        print(f"waiting   {job.waiting_reason}")
    if job.error:
        print(f"error     {job.error}")
    for key, value in (job.result or {}).items():
        print(f"result.{key}  {value}")
    return 0


def cmd_attempts(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        rows = convoy.attempts(args.id)
    print(f"{'#':>2}  {'WORKER':<24} {'DEVICE':<8} {'STARTED':<27} {'OUTCOME':<14} ERROR")
    for a in rows:
        print(f"{a['attempt']:>2}  {a['worker_id']:<24} {a.get('device') or '-':<8} "
              f"{a['started_at']:<27} {a.get('outcome') or 'running':<14} {a.get('error') or ''}")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        rows = convoy.workers()
    print(f"{'ID':<24} {'HOST':<16} {'STATE':<9} {'JOB':<32} {'DEVICES':<16} QUEUES")
    for w in rows:
        print(f"{w['id']:<24} {w['host']:<16} {w['state']:<9} {w.get('current_job') or '-':<32} "
              f"{','.join(w['devices']):<16} {','.join(w['queues'])}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        job = convoy.cancel(args.id)
    print(f"job {job.id} {job.state}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        for line in convoy.logs(args.id):
            print(f"{line['at']}  {line['level']:<7} {line['message']}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        path = convoy.download_checkpoint(args.id, args.checkpoint, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


Command = Callable[[argparse.Namespace], int]


def cmd_feature_maps(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        paths = convoy.download_feature_maps(args.id, args.out, png=not args.no_png)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def invariance_table(data: dict[str, Any], measure: str = "distance") -> list[str]:
    """An invariance job's curves as text: a row per layer, a column per transform and
    magnitude, the `measure` (distance or cosine) in each cell; then the output's agreement
    and true class probability."""
    layers = data.get("layers") or []
    output = data.get("output") or {}
    columns: list[tuple[str, Any]] = []
    for row in [*(layer["curves"] for layer in layers), output]:
        for family, points in row.items():
            for p in points:
                if (family, p["magnitude"]) not in columns:
                    columns.append((family, p["magnitude"]))
    heads = [f"{family[:5]} {magnitude:g}" for family, magnitude in columns]
    width = max([len("output p(true)"), *(len(layer["name"]) for layer in layers)]) + 2

    def line(label: str, cells: dict[tuple[str, Any], float | None]) -> str:
        return label.ljust(width) + "".join(_cell(cells.get(c)).rjust(max(len(h), 6) + 2)
                                            for c, h in zip(columns, heads, strict=True))

    out = [f"{measure} per layer".ljust(width)
           + "".join(h.rjust(max(len(h), 6) + 2) for h in heads)]
    for layer in layers:
        out.append(line(layer["name"], {(f, p["magnitude"]): p[measure]
                                         for f, points in layer["curves"].items()
                                         for p in points}))
    for key, label in (("agreement", "output agree"), ("true_class_probability",
                                                         "output p(true)")):
        if output:
            out.append(line(label, {(f, p["magnitude"]): p[key]
                                    for f, points in output.items() for p in points}))
    return out


def cmd_invariance(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        data = convoy.invariance(args.id)
    if data.get("state") != "succeeded":
        print(f"job {args.id} is {data.get('state')}: no curves yet", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(invariance_table(data, args.measure)))
    return 0


def sweep_line(sweep: dict[str, Any]) -> str:
    """One line of a sweep's progress: a bar of ended trials, the running count, the best."""
    trials, total = sweep.get("trials", []), int(sweep.get("trials_total") or 1)
    ended = sum(t["state"] in ("succeeded", "failed", "canceled") for t in trials)
    running = sum(t["state"] == "running" for t in trials)
    pruned = sum(bool(t.get("pruned")) for t in trials)
    width = 24
    filled = int(round(ended / total * width))
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {ended}/{total} trials  "
            f"{running} running  {pruned} pruned  {sweep['state']}")
    best = sweep.get("best")
    if best:
        metric = (sweep.get("objective") or {}).get("metric", "value")
        line += f"  best {metric} {best['value']:.4f} (trial {best['number']})"
    return line


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    try:
        request: dict[str, Any] = json.loads(Path(args.spec).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with _client(args) as convoy:
        sweep = convoy.submit_sweep(request, idempotency_key=args.idempotency_key)
        print(f"submitted sweep {sweep['id']} ({sweep['trials_total']} trials, "
              f"{sweep['parallel']} at once)", flush=True)
        if not args.wait:
            return 0
        tty = sys.stderr.isatty()
        last = [""]

        def show(s: dict[str, Any]) -> None:
            line = sweep_line(s)
            if tty:
                sys.stderr.write("\r" + line + "\x1b[K")
            elif line != last[0]:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last[0] = line

        sweep = convoy.wait_sweep(sweep["id"], on_poll=show)
        if tty:
            sys.stderr.write("\n")
        print_sweep(sweep)
        return {"succeeded": 0, "canceled": EXIT_CANCELED}.get(sweep["state"], EXIT_FAILED)


def print_sweep(sweep: dict[str, Any]) -> None:
    print(f"sweep {sweep['id']} {sweep['state']}")
    for t in sweep["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        note = " pruned" if t["pruned"] else ""
        print(f"  trial {t['number']:>3} {t['state']:<10}{note:<7} {value:>8}  "
              f"epochs {t['epochs']}  {params}")
    if sweep.get("best"):
        b = sweep["best"]
        print(f"best: trial {b['number']} job {b['job_id']} value {b['value']:.4f} "
              f"params {json.dumps(b['params'])}")


def cmd_sweep_status(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        print_sweep(convoy.sweep(args.id))
    return 0


def cmd_sweep_list(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        for s in convoy.sweeps(limit=args.limit):
            print(f"{s['id']:<32}  {s['state']:<10} {100 * s['progress']:4.0f}%  {s['name']}")
    return 0


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    with _client(args) as convoy:
        sweep = convoy.cancel_sweep(args.id)
    print(f"sweep {sweep['id']} {sweep['state']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Upload the image (or .npy), score it with the model of a train job, print the top
    classes of each input."""
    with _client(args) as convoy:
        upload = convoy.upload_inputs(args.image)
        source: dict[str, Any] = {"job_id": args.model}
        if args.checkpoint != "last":
            source["checkpoint"] = args.checkpoint
        job = convoy.submit({"kind": "evaluate", "source": source,
                             "inputs": {"input_id": upload["id"]}, "top_k": args.top,
                             "device": args.device})
        job = convoy.wait(job.id)
        if job.state != "succeeded":
            print(final_line(job, 0.0), file=sys.stderr)
            return exit_code(job)
        offset: int | None = 0
        while offset is not None:
            page = convoy.predictions(job.id, offset=offset, limit=1000)
            for item in page["items"]:
                ranked = ", ".join(f"{t['class']} ({t['probability']:.3f})"
                                   for t in item["top"])
                print(f"{args.image}[{item['index']}]: {ranked}")
            offset = page["next_offset"]
    return 0


def _guard(func: Command) -> Command:
    """A refused request or an unreachable server is one clear line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ConvoyError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - httpx transport errors and the like
            import httpx

            if not isinstance(exc, httpx.HTTPError):
                raise
            print(f"error: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_ERROR

    return run


def add_commands(sub: Any) -> None:
    """The client commands, each with --url/--token (or CONVOY_URL/CONVOY_TOKEN)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server URL (CONVOY_URL; default http://127.0.0.1:8000)")
    common.add_argument("--token", help="API token (CONVOY_TOKEN)")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.set_defaults(func=_guard(func))
        return p

    p = add("submit", cmd_submit, "submit a job from a JSON file")
    p.add_argument("spec", help="job request JSON (see examples/)")
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar; exit "
                   "code 0 succeeded, 1 failed, 3 canceled")
    p.add_argument("--epochs", type=ascii_int, help="override train.epochs")
    p.add_argument("--name", help="override the job name")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the device")
    p.add_argument("--devices", type=ascii_int, help="train on N devices of one worker "
                   "(resources.devices; docs/distributed.md)")
    p.add_argument("--priority", type=ascii_int, choices=range(10), metavar="0..9",
                   help="override the priority (9 most urgent; default 5)")
    p.add_argument("--idempotency-key", help="send this Idempotency-Key (default: a fresh one, "
                   "reused by the automatic retries); running the command again with the same "
                   "key and file gives the same job, never a second one")
    p = add("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--state")
    p.add_argument("--kind")
    p.add_argument("--limit", type=ascii_int, default=50)
    add("status", cmd_status, "show one job").add_argument("id")
    add("cancel", cmd_cancel, "cancel a queued or running job").add_argument("id")
    add("attempts", cmd_attempts, "a job's attempts: worker, device, outcome, error"
        ).add_argument("id")
    add("workers", cmd_workers, "the live workers (admin token)")
    add("logs", cmd_logs, "print a job's log lines").add_argument("id")
    p = add("fetch", cmd_fetch, "download a checkpoint")
    p.add_argument("id")
    p.add_argument("--checkpoint", default="last", help="last (default) or a checkpoint name")
    p.add_argument("--out", help="file or folder (default: the checkpoint's name)")
    p = add("feature-maps", cmd_feature_maps, "download a feature-map job's maps")
    p.add_argument("id")
    p.add_argument("--out", required=True, help="folder")
    p.add_argument("--no-png", action="store_true", help="only the .npy arrays")
    p = add("invariance", cmd_invariance, "print an invariance job's curves as a table")
    p.add_argument("id")
    p.add_argument("--measure", choices=["distance", "cosine"], default="distance",
                   help="what each cell shows (default: distance)")
    sweep = sub.add_parser("sweep", help="hyperparameter sweeps (docs/sweeps.md)")
    sweeps = sweep.add_subparsers(dest="sweep_command", required=True)

    def add_sweep(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sweeps.add_parser(name, help=help_text, parents=[common])
        p.set_defaults(func=_guard(func))
        return p

    p = add_sweep("submit", cmd_sweep_submit, "submit a sweep from a JSON file")
    p.add_argument("spec", help="sweep request JSON (see examples/sweeps/digits-sweep.json)")
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar of "
                   "trials; exit code 0 succeeded, 1 failed, 3 canceled")
    p.add_argument("--idempotency-key", help="send this Idempotency-Key")
    add_sweep("status", cmd_sweep_status, "show a sweep's trials and best").add_argument("id")
    add_sweep("cancel", cmd_sweep_cancel, "cancel a sweep and its trials").add_argument("id")
    p = add_sweep("list", cmd_sweep_list, "list sweeps, newest first")
    p.add_argument("--limit", type=ascii_int, default=50)
    p = add("predict", cmd_predict, "classify an image (PNG/JPEG) or a .npy of inputs with a "
            "trained model: submits an evaluate job, waits, prints the top classes")
    p.add_argument("image")
    p.add_argument("--model", required=True, help="the train job whose checkpoint to use")
    p.add_argument("--checkpoint", default="last", help="last (default) or a checkpoint name")
    p.add_argument("--top", type=ascii_int, default=3, help="classes shown per input")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
