"""worker.train.train called directly on digits (no Celery, no HTTP): reproducible seeds,
exact resume from checkpoint bytes, NaN detection and stopping; then a diverging job
through the real stack ends `failed` with that readable error."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from convoy.datasets import load_digits
from convoy.jobspec import TrainConfig
from models.build import build_model
from models.spec import ModelSpec
from tests.factories import train_request
from tests.services import wait_job
from worker.checkpoints import load_model_state, model_bytes, optimizer_bytes, restore_optimizer
from worker.control import Stopped
from worker.train import DeviceData, EpochReport, NonFiniteLoss, seed_torch, train

CPU = torch.device("cpu")
# batchnorm (running buffers) and dropout (RNG) make an exact resume harder than plain SGD
SPEC = {
    "input_shape": [1, 8, 8], "num_classes": 10,
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"}, {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"}, {"type": "dropout", "p": 0.2},
        {"type": "linear", "out_features": 10},
    ],
}
# no activation between the linear layers: each one's gradient grows with the others' weights,
# so a large step blows up multiplicatively until the loss is no longer finite
DIVERGING = {
    "input_shape": [1, 8, 8], "num_classes": 10,
    "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 64},
               {"type": "linear", "out_features": 64}, {"type": "linear", "out_features": 10}],
}


@pytest.fixture(scope="module")
def data() -> DeviceData:
    return DeviceData.from_numpy(load_digits(), CPU)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # one thread, as the test workers run: the test process shares the cores with them
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh_model(seed: int = 0, spec: dict[str, Any] = SPEC) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec.model_validate(spec))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_weights_and_metrics(data):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9, seed=3)
    runs = []
    for _ in range(2):
        model = fresh_model(3)
        result = train(model, data, cfg)
        runs.append((state(model), result))
    (a, ra), (b, rb) = runs
    assert same(a, b)
    assert ra == rb
    assert ra["epochs_done"] == 2 and ra["steps"] == 2 * 23
    # and a different seed is a different run (the check above is not vacuous)
    other = fresh_model(3)
    train(other, data, cfg.model_copy(update={"seed": 4}))
    assert not same(a, state(other))


def test_seed_torch_draws_what_torch_manual_seed_draws_without_formatting_a_stack(monkeypatch):
    """worker.train seeds every epoch with seed_torch: the same CPU draws (weights, the
    permutation, dropout) as torch.manual_seed, without the formatted stack torch.manual_seed
    queues for an uninitialised CUDA (milliseconds per call in a worker's deep stack)."""
    import traceback

    def draws() -> list[torch.Tensor]:
        weights = build_model(ModelSpec.model_validate(SPEC)).state_dict().values()
        return [torch.randperm(97), torch.rand(5), *weights]

    torch.manual_seed(1234)
    expected = draws()
    torch.manual_seed(99)  # another state in between
    formatted: list[int] = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack",
                        lambda *a, **k: formatted.append(1) or real(*a, **k))
    seed_torch(1234, torch.device("cpu"))
    got = draws()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert formatted == []
    torch.manual_seed(1234)  # the check is not vacuous: torch.manual_seed formats stacks here
    assert torch.cuda.is_initialized() or formatted


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_epoch_2_checkpoint_equals_4_epochs_straight(data, optimizer):
    cfg = TrainConfig(epochs=4, batch_size=64, optimizer=optimizer, lr=0.05 if optimizer ==
                      "sgd" else 0.003, momentum=0.9, lr_schedule="cosine", seed=1)
    saved: dict[int, tuple[bytes, bytes]] = {}

    def keep(report: EpochReport) -> None:
        saved[report.epoch] = (model_bytes(report.model, {"epoch": report.epoch}),
                               optimizer_bytes(report.optimizer))

    straight = fresh_model(1)
    straight_result = train(straight, data, cfg, on_epoch=keep)
    assert sorted(saved) == [1, 2, 3, 4]
    weights_blob, optim_blob = saved[2]

    # a fresh process would build a fresh model (another init) and optimizer, then load bytes
    resumed = fresh_model(99)
    resumed.load_state_dict(load_model_state(weights_blob))
    opt = torch.optim.SGD(resumed.parameters(), lr=1.0) if optimizer == "sgd" else \
        torch.optim.Adam(resumed.parameters(), lr=1.0)
    restore_optimizer(opt, optim_blob, CPU)
    resumed_result = train(resumed, data, cfg, optimizer=opt, start_epoch=2)

    assert same(state(straight), state(resumed))
    assert resumed_result == straight_result

    # the optimizer state matters: resuming the weights alone gives another model
    weights_only = fresh_model(99)
    weights_only.load_state_dict(load_model_state(weights_blob))
    fresh_opt = torch.optim.SGD(weights_only.parameters(), lr=cfg.lr, momentum=cfg.momentum) \
        if optimizer == "sgd" else torch.optim.Adam(weights_only.parameters(), lr=cfg.lr)
    train(weights_only, data, cfg, optimizer=fresh_opt, start_epoch=2)
    assert not same(state(straight), state(weights_only))


def test_huge_lr_raises_non_finite_loss_naming_epoch_and_step(data):
    # TrainConfig caps lr at 10 for submissions; the loop itself must cope with anything
    cfg = TrainConfig.model_construct(**{**TrainConfig().model_dump(), "epochs": 3,
                                         "lr": 1e6, "momentum": 0.0})
    epochs_seen: list[int] = []
    with pytest.raises(NonFiniteLoss) as info:
        train(fresh_model(0, DIVERGING), data, cfg,
              on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert re.fullmatch(r"loss became NaN at epoch 1 step \d+", str(info.value)), str(info.value)
    assert info.value.epoch == 1 and 1 <= info.value.step <= 23
    assert epochs_seen == []  # no checkpoint of a broken model


def test_should_stop_raises_stopped_between_steps(data):
    cfg = TrainConfig(epochs=3, batch_size=64, seed=0)
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return True

    epochs_seen: list[int] = []
    with pytest.raises(Stopped):
        train(fresh_model(), data, cfg, should_stop=stop, check_every_s=0.0,
              on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert calls == 1
    assert epochs_seen == []


def test_should_stop_after_an_epoch_keeps_that_epoch(data):
    cfg = TrainConfig(epochs=3, batch_size=64, seed=0)
    epochs_seen: list[int] = []
    with pytest.raises(Stopped):
        # a huge check interval: only the end-of-epoch check runs
        train(fresh_model(), data, cfg, should_stop=lambda: bool(epochs_seen),
              check_every_s=1e9, on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [1]


def test_diverging_job_through_the_stack_fails_with_a_readable_error(client):
    request = train_request(3, model=DIVERGING, lr=10, momentum=0.0)
    r = client.post("/v1/jobs", json=request)
    assert r.status_code == 201, r.text
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "failed"
    assert re.fullmatch(r"loss became NaN at epoch 1 step \d+", done["error"]), done["error"]
    assert done["result"] is None or "val_accuracy" not in done["result"]
    assert client.get(f"/v1/jobs/{done['id']}/checkpoints").json() == []


def test_resume_after_the_last_epoch_still_reports_validation_metrics(data):
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0)
    saved: dict[int, bytes] = {}
    straight = fresh_model()
    result = train(straight, data, cfg,
                   on_epoch=lambda r: saved.update({r.epoch: model_bytes(r.model, {})}))
    # the worker died after writing epoch 2's checkpoint but before recording the outcome
    resumed = fresh_model(5)
    resumed.load_state_dict(load_model_state(saved[2]))
    again = train(resumed, data, cfg, start_epoch=2, on_epoch=lambda r: pytest.fail("trained"))
    assert again["epochs_done"] == 2 and again["steps"] == result["steps"]
    assert again["val_accuracy"] == result["val_accuracy"]
    assert again["val_loss"] == result["val_loss"]
