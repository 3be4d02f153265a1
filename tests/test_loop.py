"""course_lib.parts.loop, the one training loop: schedules against transformers' and torch's, the optimiser's
groups, accumulation, early stopping with the best weights restored, the per-step hook, step timing, errors.
(The language model's use of it, with checkpoints and resume, is tested in test_lm.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from course_lib.parts.loop import History, LoopConfig, cosine_schedule, linear_schedule, make_optimizer, train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def regression_batches(seed=0, n=8):
    """y = x·w* + noise, endless."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=g)
    while True:
        x = torch.randn(n, 4, generator=g)
        yield x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


QUIET = dict(progress=False, log_every=1)


# ---------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 40), (1, 1)])
def test_linear_schedule_without_offset_is_transformers_linear_warmup(warmup, total):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_linear_schedule_with_warmup(opt, warmup, total)
    ours = linear_schedule(1.0, warmup, total, offset=0)
    for step in range(total + 2):
        assert ours(step) == pytest.approx(theirs.get_last_lr()[0]), step
        opt.step()
        theirs.step()


def test_linear_schedule_with_offset_skips_the_zero_first_step():
    ours = linear_schedule(2.0, 4, 10)
    assert ours(0) == pytest.approx(2.0 * 1 / 4) and ours(3) == pytest.approx(2.0)
    assert ours(9) == pytest.approx(2.0 * 1 / 7) and ours(10) == 0.0   # the last step still learns a little
    assert linear_schedule(2.0, 4, 10, offset=0)(0) == 0.0


def test_cosine_schedule_endpoints():
    lr_of = cosine_schedule(1e-3, 5, 30, 1e-4)
    assert lr_of(0) == pytest.approx(2e-4) and lr_of(4) == pytest.approx(1e-3) and lr_of(5) == pytest.approx(1e-3)
    assert lr_of(29) == pytest.approx(1e-4) and lr_of(100) == 1e-4
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        cosine_schedule(1e-3, 31, 30)


def test_the_loop_uses_the_schedule_of_every_step():
    seen = []
    config = LoopConfig(steps=6, lr=1.0, schedule=lambda s: 0.1 * (s + 1), grad_clip=None, **QUIET)
    model = linear_model()
    optimizer = make_optimizer(model, 1.0)
    train(model, regression_batches(), mse, config, optimizer=optimizer,
          on_step=lambda s: seen.append(optimizer.param_groups[0]["lr"]))
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


# ---------------------------------------------------------------------------------------------- the optimiser

def test_weight_decay_on_matrices_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = make_optimizer(model, 1e-3, 0.01).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False), 0.01)


def test_one_step_equals_a_hand_written_step():
    """zero_grad, forward, backward, clip, AdamW step with the schedule's lr: what the loop does, by hand."""
    batches = list(itertools.islice(regression_batches(), 3))
    ours, theirs = linear_model(), linear_model()
    config = LoopConfig(steps=3, lr=0.1, schedule="constant", grad_clip=0.5, weight_decay=0.1, **QUIET)
    history = train(ours, iter(batches), mse, config)
    optimizer = make_optimizer(theirs, 0.1, 0.1, config.betas)
    losses = []
    for batch in batches:
        loss = mse(theirs, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert history.losses == losses
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_accumulation_averages_the_micro_batches():
    whole = list(itertools.islice(regression_batches(n=8), 4))
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in whole for i in (0, 4)]
    a, b = linear_model(), linear_model()
    train(a, iter(whole), mse, LoopConfig(steps=4, lr=0.05, schedule="constant", **QUIET))
    train(b, iter(halves), mse, LoopConfig(steps=4, lr=0.05, schedule="constant", grad_accum=2, **QUIET))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- evaluation

def test_evaluation_runs_in_eval_mode_without_gradients_and_is_not_training_time():
    model = nn.Sequential(nn.Linear(4, 1), nn.Dropout(0.5))
    seen = []

    def evaluate(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"val": 1.0}

    history = train(model, regression_batches(), mse, LoopConfig(steps=6, eval_every=2, **QUIET), evaluate=evaluate)
    assert seen == [(False, False)] * 3 and history.eval_step == [2, 4, 6]
    assert history.column("val") == [1.0, 1.0, 1.0] and history.eval_seconds > 0
    assert not model.training                       # a trained model is handed back ready to use


def test_keep_best_stops_early_and_restores_the_best_weights():
    model = linear_model()
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.8])
    snapshots = {}

    def evaluate(m):
        step = len(snapshots) + 1
        snapshots[step] = m.weight.detach().clone()
        return {"acc": next(scores)}

    config = LoopConfig(steps=20, eval_every=2, keep_best="acc", patience=2, **QUIET)
    history = train(model, regression_batches(), mse, config, evaluate=evaluate)
    assert history.stopped_early and history.best_step == 4 and history.steps_done == 8
    assert not history.interrupted
    assert torch.equal(model.weight, snapshots[2])  # the weights of the best evaluation (step 4)
    with pytest.raises(KeyError, match="keep_best='loss'"):
        train(linear_model(), regression_batches(), mse, LoopConfig(steps=2, keep_best="loss", **QUIET),
              evaluate=lambda m: {"acc": 1.0})


# ---------------------------------------------------------------------------------------------- hooks, timing

def test_on_step_sees_the_gradients_before_they_are_cleared():
    norms = []
    model = linear_model()
    train(model, regression_batches(), mse, LoopConfig(steps=3, **QUIET),
          on_step=lambda step: norms.append((step, model.weight.grad is not None)))
    assert norms == [(0, True), (1, True), (2, True)] and model.weight.grad is None


def test_step_times_are_measured_through_the_one_timer(monkeypatch):
    """Every timed step waits for the device before and after (tools.timing.sync), so on a GPU the times
    are of the kernels, not of their launch."""
    from course_lib.tools import timing

    synced = []
    monkeypatch.setattr(timing, "sync", lambda device=None: synced.append(device))
    history = train(linear_model(), regression_batches(), mse, LoopConfig(steps=4, time_steps=True, log_every=4,
                                                                          progress=False))
    assert len(history.step_seconds) == 4 and all(t > 0 for t in history.step_seconds)
    assert len(synced) >= 2 * 4 and set(synced) == {torch.device("cpu")}


def test_tokens_per_second_and_logging_windows():
    history = train(linear_model(), regression_batches(), mse, LoopConfig(steps=10, log_every=4, progress=False),
                    tokens_in=lambda batch: batch[0].shape[0])
    assert history.step == [4, 8, 10] and history.tokens_seen == 80 and len(history.tokens_per_s) == 3
    assert history.train_loss[0] == pytest.approx(sum(history.losses[:4]) / 4, rel=1e-6)
    assert history.mfu == [None, None, None] and history.optimizer_bytes > 0


# ---------------------------------------------------------------------------------------------- errors

def test_bad_input_gets_one_sentence():
    with pytest.raises(ValueError, match="batches ran out after 2 steps of 5"):
        train(linear_model(), iter(list(itertools.islice(regression_batches(), 2))), mse,
              LoopConfig(steps=5, **QUIET))
    with pytest.raises(TypeError, match="must return a scalar loss tensor, but it returned Tensor of shape"):
        train(linear_model(), regression_batches(), lambda m, b: m(b[0]), LoopConfig(steps=1, **QUIET))
    with pytest.raises(ValueError, match="schedule must be 'cosine', 'linear', 'constant' or a function"):
        LoopConfig(schedule="step")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        LoopConfig(lr=0)
    with pytest.raises(ValueError, match="progress must be True .* pass progress=True, not a bar's update method"):
        LoopConfig(progress=lambda n=1: None)   # what lesson 09 once passed (a tqdm bar's update)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        train(lambda x: x, regression_batches(), mse)
    assert History.from_dict(History(step=[1]).to_dict()).step == [1]
