"""Sweeps (issue 20): the checks of a sweep request, and the sweep driver, a thread in the
API process beside the reconciler. Each pass, for every running sweep, it copies ended
trials' outcomes from their jobs, asks the pruner about running trials, tops the trials up
to `parallel`, and ends the sweep when every trial has ended.

The Optuna study lives in no table of its own: each pass rebuilds it in memory from the
sweep's trial rows (params, state, objective value, the objective metric per epoch, the
pruner's rung notes) and asks it for the next trial with Optuna's ask interface. The trial
row and its train job are then written in one transaction with the trial's number unique in
the sweep (db.sweeps.add_trial), so a driver killed anywhere in between starts no trial
twice and loses none. Optuna is imported only here (torch-free; about 0.3 s and 5 MB)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from fastapi import HTTPException
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.submit import check_timeout, check_train
from api.ticker import Ticker
from convoy import sweepspec
from convoy.jobspec import TrainJobRequest, dump
from convoy.queue import enqueue
from convoy.settings import Settings
from convoy.sweepspec import CategoricalParam, FloatParam, IntParam, SweepRequest
from db import jobs as jobs_db
from db import sweeps as sweeps_db
from db.session import session_scope
from db.states import JobState
from db.tables import Job, Sweep, SweepTrial

log = logging.getLogger(__name__)

MAX_GRID = 10_000
ENDED = {"succeeded", "failed", "canceled"}


# -- checks ------------------------------------------------------------------------------------

def _reason(exc: HTTPException | ValidationError) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3])
    detail = exc.detail
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}"
                         for d in detail[:3])
    return str(detail)


def check_body(session: Session, body: dict[str, Any], settings: Settings, *, tenant: str
               ) -> tuple[TrainJobRequest, dict[str, Any], float]:
    """A trial's (or the base's) train job body checked as POST /v1/jobs checks it: the
    request, its summary and its timeout; ValidationError or HTTPException(422) otherwise."""
    req = TrainJobRequest.model_validate(body)
    summary = check_train(session, req, settings, tenant=tenant)
    return req, summary, check_timeout(req, settings)


def _unprocessable(loc: list[str | int], message: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


def check_sweep(session: Session, req: SweepRequest, settings: Settings, *, tenant: str
                ) -> dict[str, Any]:
    """The sweep request with its base body completed (defaults filled in), or a 422 naming
    the field: base, a path of space, a bound that makes a trial invalid, the grid."""
    base_in = {"kind": "train", **req.base}
    try:
        base, _, _ = check_body(session, base_in, settings, tenant=tenant)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise _unprocessable(["base", *e["loc"]], e["msg"]) from None
    except HTTPException as exc:
        if isinstance(exc.detail, list):
            exc.detail = [{**d, "loc": ["body", "base", *d["loc"][1:]]} for d in exc.detail]
        raise
    base_json = dump(base)
    for path, param in req.space.items():
        try:
            sweepspec.check_path(base_json, path, param)
        except sweepspec.BadPath as exc:
            raise _unprocessable(["space", path], str(exc)) from None
        node, key = sweepspec._walk(base_json, path)
        current = node[key]
        if param.type == "float" and isinstance(current, int) and not isinstance(current, bool):
            raise _unprocessable(["space", path, "type"], f"{path} is an integer field; use "
                                                          "type int (or categorical)")
        for where, value in _corners(param):
            try:
                check_body(session, sweepspec.apply(base_json, {path: value}), settings,
                           tenant=tenant)
            except (ValidationError, HTTPException) as exc:
                raise _unprocessable(["space", path, *where],
                                     f"{path}={value!r} makes a trial invalid: "
                                     f"{_reason(exc)}") from None
    if req.sampler == "grid":
        size = math.prod(len(values) for values in _grid(req).values())
        if req.trials > size:
            raise _unprocessable(["trials"], f"{req.trials} trials but the grid has only "
                                             f"{size} points")
    return base_json


def _corners(param: FloatParam | IntParam | CategoricalParam
             ) -> list[tuple[list[str | int], Any]]:
    if isinstance(param, CategoricalParam):
        return [(["choices", i], c) for i, c in enumerate(param.choices)]
    return [(["low"], param.low), (["high"], param.high)]


def _grid(req: SweepRequest) -> dict[str, list[Any]]:
    """The grid sampler's search space: choices, or every int in [low, high]; 422 for a float
    range or a grid past MAX_GRID points."""
    grid: dict[str, list[Any]] = {}
    for path, param in req.space.items():
        if isinstance(param, CategoricalParam):
            grid[path] = list(param.choices)
        elif isinstance(param, IntParam) and param.high - param.low < MAX_GRID:
            grid[path] = list(range(param.low, param.high + 1))
        else:
            raise _unprocessable(["space", path, "type"], "the grid sampler needs categorical "
                                 f"choices or a small int range (at most {MAX_GRID} values)")
    size = 1
    for values in grid.values():
        size *= len(values)
        if size > MAX_GRID:
            raise _unprocessable(["space"], f"the grid has more than {MAX_GRID} points")
    return grid


# -- the study, rebuilt from the trial rows ---------------------------------------------------

@dataclass
class TrialView:
    number: int
    params: dict[str, Any]
    state: str
    value: float | None = None
    pruned: bool = False
    intermediate: dict[int, float] = field(default_factory=dict)
    pruner_attrs: dict[str, Any] = field(default_factory=dict)


def _distributions(req: SweepRequest) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for path, p in req.space.items():
        if isinstance(p, FloatParam):
            out[path] = FloatDistribution(p.low, p.high, log=p.log)
        elif isinstance(p, IntParam):
            out[path] = IntDistribution(p.low, p.high, log=p.log)
        else:
            out[path] = CategoricalDistribution(p.choices)
    return out


def build_study(req: SweepRequest, views: list[TrialView], *, number: int) -> Any:
    """An in-memory Optuna study holding `views`, with the sweep's sampler seeded for trial
    `number` (a sampler rebuilt with one seed would propose the same point every pass)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = (req.seed * 1_000_003 + number) % 2**32
    sampler: Any
    if req.sampler == "grid":
        sampler = optuna.samplers.GridSampler(_grid(req), seed=req.seed)
    elif req.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                             n_startup_trials=min(10, max(2, req.trials // 4)))
    pruner: Any
    if req.pruner.type == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=req.pruner.startup_trials,
                                             n_warmup_steps=0)
    elif req.pruner.type == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=req.pruner.min_epochs, reduction_factor=req.pruner.reduction_factor)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize" if req.objective.mode == "max"
                                else "minimize", sampler=sampler, pruner=pruner)
    dists = _distributions(req)
    for v in views:
        if v.state == "succeeded" and not v.pruned and v.value is not None:
            state, value = TrialState.COMPLETE, v.value
        elif v.pruned:
            state, value = TrialState.PRUNED, None
        elif v.state in ("queued", "running"):
            state, value = TrialState.RUNNING, None
        else:
            state, value = TrialState.FAIL, None
        if set(v.params) != set(dists):  # refused at validation with no params drawn
            continue
        study.add_trial(create_trial(params=v.params, distributions=dists, state=state,
                                     value=value, intermediate_values=v.intermediate,
                                     system_attrs=v.pruner_attrs))
    return study


def ask(req: SweepRequest, views: list[TrialView], *, number: int) -> dict[str, Any]:
    study = build_study(req, views, number=number)
    trial = study.ask(_distributions(req))
    return {path: trial.params[path] for path in req.space}


def should_prune(req: SweepRequest, views: list[TrialView], index: int, *,
                 study: Any = None) -> tuple[bool, dict[str, Any]]:
    """The pruner's answer for running trial views[index], and its rung notes to keep.
    `study`: one build_study of `views` shared by every check of a pass."""
    study = study if study is not None else build_study(req, views, number=len(views))
    number = [i for i, v in enumerate(views) if set(v.params) == set(req.space)].index(index)
    prune = bool(study.pruner.prune(study, study.trials[number]))
    attrs = {k: v for k, v in study.trials[number].system_attrs.items()
             if k.startswith("completed_rung_")}
    return prune, attrs


# -- the driver --------------------------------------------------------------------------------

def _objective(job: Job, metric: str) -> float | None:
    value = (job.result or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def drive_sweep(settings: Settings, celery: Celery, sweep_id: str) -> None:
    """One pass over one running sweep."""
    with session_scope(settings.database_url) as session:
        sweep = sweeps_db.get_sweep(session, sweep_id=sweep_id)
        if sweep is None or sweep.state != sweeps_db.RUNNING:
            return
        req = SweepRequest.model_validate(sweep.request["sweep"])
        base = sweep.request["base"]
        metric = req.objective.metric
        rows = sweeps_db.trials(session, sweep_id=sweep_id)
        series = sweeps_db.metric_by_epoch(
            session, job_ids=[j.id for _, j in rows if j is not None], name=metric)
        views = [_sync(session, t, j, series.get(j.id, {}) if j else {}, metric)
                 for t, j in rows]
        if req.pruner.type != "none":
            _prune(session, req, rows, views)
        _top_up(session, settings, celery, sweep, req, base, views)
        _set_best_or_finish(session, sweep, req, views)


def _sync(session: Session, t: SweepTrial, job: Job | None, intermediate: dict[int, float],
          metric: str) -> TrialView:
    """The trial's view, its row updated from its job where the job moved on."""
    view = TrialView(t.number, dict(t.params), t.state, t.value, t.pruned, intermediate,
                     dict(t.pruner_attrs or {}))
    if job is None or t.state in ENDED:
        return view
    values: dict[str, Any] = {}
    epochs = max(intermediate, default=0)
    if job.state != t.state:
        values["state"] = str(job.state)
    if JobState(job.state).terminal:
        result = job.result or {}
        pruned = bool(result.get("pruned"))
        value = _objective(job, metric)
        if pruned and value is None and intermediate:
            value = intermediate[max(intermediate)]
        values.update(pruned=pruned, value=value, error=job.error,
                      epochs=int(result.get("epochs_done") or epochs))
    elif epochs != t.epochs:
        values["epochs"] = epochs
    if values:
        sweeps_db.update_trial(session, trial_id=t.id, **values)
        view.state = values.get("state", view.state)
        view.value = values.get("value", view.value)
        view.pruned = values.get("pruned", view.pruned)
    return view


def _prune(session: Session, req: SweepRequest, rows: list[tuple[SweepTrial, Job | None]],
           views: list[TrialView]) -> None:
    study: Any = None
    for i, ((t, job), view) in enumerate(zip(rows, views, strict=True)):
        if job is None or view.state != "running" or not view.intermediate:
            continue
        epoch = max(view.intermediate)
        total = int((job.request or {}).get("train", {}).get("epochs") or 0)
        if epoch < req.pruner.min_epochs or epoch >= total:
            continue
        if study is None:
            study = build_study(req, views, number=len(views))
        prune, attrs = should_prune(req, views, i, study=study)
        if attrs != view.pruner_attrs:
            sweeps_db.update_trial(session, trial_id=t.id, pruner_attrs=attrs)
            view.pruner_attrs = attrs
        if prune:
            reason = (f"{req.objective.metric} {view.intermediate[epoch]:.4g}; the "
                      f"{req.pruner.type} pruner stopped the trial")
            if jobs_db.prune_job(session, job_id=job.id, epoch=epoch, reason=reason):
                log.info("sweep %s: trial %d (job %s) pruned after epoch %d", t.sweep_id,
                         t.number, job.id, epoch)


def _top_up(session: Session, settings: Settings, celery: Celery, sweep: Sweep,
            req: SweepRequest, base: dict[str, Any], views: list[TrialView]) -> None:
    active = sum(v.state in ("queued", "running") for v in views)
    while active < req.parallel and len(views) < req.trials:
        number = len(views)
        params = ask(req, views, number=number)
        body = sweepspec.apply(base, params)
        try:
            trial_req, summary, timeout = check_body(session, body, settings,
                                                     tenant=sweep.tenant)
        except (ValidationError, HTTPException) as exc:
            session.rollback()
            error = f"422: {_reason(exc)}"
            made = sweeps_db.add_trial(session, sweep=sweep, number=number, params=params,
                                       max_queued=settings.max_queued_per_tenant, error=error)
            if made is False:
                return  # another driver made this trial: next pass
            views.append(TrialView(number, params, "failed"))
            continue
        fields = {"kind": "train", "name": f"{sweep.name or 'sweep'} trial {number}"[:128],
                  "request": dump(trial_req), "summary": summary,
                  "max_attempts": trial_req.max_attempts or settings.max_attempts,
                  "timeout_seconds": timeout}
        try:
            made = sweeps_db.add_trial(session, sweep=sweep, number=number, params=params,
                                       max_queued=settings.max_queued_per_tenant,
                                       job_fields=fields)
        except jobs_db.QueueFull:
            return  # the tenant's quota: try again next pass
        if made is False:
            return
        assert isinstance(made, Job)
        views.append(TrialView(number, params, "queued"))
        active += 1
        try:
            enqueue(celery, kind="train", job_id=made.id, device=trial_req.device,
                    devices=trial_req.resources.devices, priority=trial_req.priority)
        except Exception:  # noqa: BLE001 - the reconciler sends it
            log.warning("enqueue of sweep trial %s failed; reconciler will retry", made.id,
                        exc_info=True)


def best_of(req: SweepRequest, views: list[TrialView], rows: dict[int, str | None]
            ) -> dict[str, Any] | None:
    done = [v for v in views if v.state == "succeeded" and not v.pruned and v.value is not None]
    if not done:
        return None
    pick = max if req.objective.mode == "max" else min
    best = pick(done, key=lambda v: v.value or 0.0)
    return {"number": best.number, "job_id": rows.get(best.number), "params": best.params,
            "value": best.value}


def _set_best_or_finish(session: Session, sweep: Sweep, req: SweepRequest,
                        views: list[TrialView]) -> None:
    job_ids = {t.number: t.job_id for t, _ in sweeps_db.trials(session, sweep_id=sweep.id)}
    best = best_of(req, views, job_ids)
    if len(views) >= req.trials and all(v.state in ENDED for v in views):
        state = sweeps_db.SUCCEEDED if best else sweeps_db.FAILED
        sweeps_db.finish_sweep(session, sweep_id=sweep.id, state=state, best=best,
                               error=None if best else "no trial finished with a value")
    elif best != sweep.best:
        sweeps_db.set_best(session, sweep_id=sweep.id, best=best)


def drive_once(settings: Settings, celery: Celery) -> int:
    """One pass over every running sweep; returns how many there were."""
    with session_scope(settings.database_url) as session:
        ids = sweeps_db.running_ids(session)
    for sweep_id in ids:
        try:
            drive_sweep(settings, celery, sweep_id)
        except Exception:  # one sweep's trouble (the database away) must not stop the rest
            log.warning("sweep driver: pass over sweep %s failed", sweep_id, exc_info=True)
    return len(ids)


class SweepDriver(Ticker):
    def __init__(self, settings: Settings, celery: Celery) -> None:
        super().__init__("sweep-driver")
        self.settings, self.celery = settings, celery

    def interval(self) -> float:
        return self.settings.sweep_interval_seconds

    def tick(self) -> None:
        try:
            drive_once(self.settings, self.celery)
        except Exception:  # the database is down: next tick
            log.warning("sweep driver pass failed", exc_info=True)


__all__ = ["SweepDriver", "build_study", "check_sweep", "drive_once"]
