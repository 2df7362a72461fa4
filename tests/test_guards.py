"""guards: the gradient-norm spike test (in the sync-free step and in the eager optimiser) and the collapse rollback."""
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fast_step import CapturedTrainStep
from guards import CollapseRollback, GradNormSpikeGuard
from test_fast_step import adamw, batch, params_of, tiny_model
from training_loop import NonFiniteStepSkippingAdamW


def feed(guard, norms):
    return [bool(guard.check(torch.tensor(float(n)))) for n in norms]


def test_spike_is_relative_to_the_running_median_and_follows_a_lasting_change():
    guard = GradNormSpikeGuard(factor=10, window=8, min_history=4)
    assert feed(guard, [1, 1, 1]) == [False] * 3  # too little history
    assert feed(guard, [100]) == [False]  # 3 norms seen: still too few
    assert feed(guard, [1, 9.9, 10.5]) == [False, False, True]  # median 1: 10.5 is a spike, 9.9 is not
    assert feed(guard, [float("inf"), float("nan")]) == [False, False]  # non-finite: skipped as such, not as spikes
    # a lasting change of scale: skipped at first, followed once it fills half the window
    flags = feed(guard, [50] * 8)
    assert flags[0] and not flags[-1]
    assert int(guard.spikes) == sum(flags) + 1


def test_a_norm_at_or_below_the_floor_is_never_a_spike():
    """Near zero loss the median norm is tiny: 10x it is an ordinary step, below the clipping norm (the floor)."""
    guard = GradNormSpikeGuard(factor=10, window=8, min_history=4, floor=1.0)
    feed(guard, [0.01] * 8)
    assert feed(guard, [0.5, 1.0, 1.5]) == [False, False, True]
    assert int(guard.spikes) == 1
    with pytest.raises(ValueError, match="floor"):
        GradNormSpikeGuard(factor=10, floor=-1.0)


def test_the_trainer_sets_the_floor_to_its_clipping_norm():
    from training_args import TrainArgs
    from training_experiment import optimizer_kwargs

    for clip, floor in ((1.0, 1.0), (0.25, 0.25), (0.0, 0.0), (-1.0, 0.0)):
        kwargs = optimizer_kwargs(TrainArgs(max_grad_norm=clip))
        optimizer = NonFiniteStepSkippingAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)
        assert optimizer.spike_guard.floor == floor and optimizer.spike_guard.factor == 10.0


def test_spike_guard_off_and_state_round_trip_in_place():
    off = GradNormSpikeGuard(factor=0)
    assert not off.enabled and feed(off, [1] * 60 + [1e9]) == [False] * 61
    guard = GradNormSpikeGuard(factor=5, window=6, min_history=2)
    feed(guard, [1, 2, 3])
    live = guard.live_tensors()
    other = GradNormSpikeGuard(factor=5, window=6, min_history=2)
    kept = other.live_tensors()
    other.load_state_dict(guard.state_dict())
    assert all(a is b for a, b in zip(kept, other.live_tensors()))  # same tensors: a recorded graph keeps them
    for a, b in zip(live, other.live_tensors()):
        torch.testing.assert_close(a, b, equal_nan=True)
    with pytest.raises(ValueError, match="window"):
        GradNormSpikeGuard(factor=5, window=4, min_history=5)


def primed_guard(model, optimizer=None):
    """A guard whose history says the norm is ~1e-6, so the next real step is a spike."""
    guard = GradNormSpikeGuard(factor=10, window=8, min_history=4)
    feed(guard, [1e-6] * 8)
    return guard


def test_sync_free_step_skips_a_spike_without_a_trace():
    model = tiny_model()
    optimizer = adamw(model)
    guard = primed_guard(model)
    step = CapturedTrainStep(model, optimizer, use_cuda_graph=False, spike_guard=guard)
    before = params_of(model)
    out = step(batch())
    assert out.spike.item() == 1.0 and out.finite.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert step.skip_counts()["spike_skipped_steps"] == 1 and step.skip_counts()["skipped_steps"] == 0
    # without a spike the step is applied
    guard.load_state_dict(GradNormSpikeGuard(factor=10, window=8, min_history=4).state_dict())
    out = step(batch())
    assert out.spike.item() == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_eager_optimizer_skips_a_spike_and_keeps_the_guard_in_its_state_dict():
    model = tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = NonFiniteStepSkippingAdamW(params, lr=1e-2, spike_factor=10, spike_window=8)
    feed(optimizer.spike_guard, [1e-6] * 8)
    model(**batch()).loss.backward()
    before = params_of(model)
    optimizer.pre_clip_grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert int(optimizer.spike_guard.spikes) == 1 and optimizer.skipped_steps == 0
    state = optimizer.state_dict()
    fresh = NonFiniteStepSkippingAdamW(params, lr=1e-2, spike_factor=10, spike_window=8)
    fresh.load_state_dict(state)
    assert int(fresh.spike_guard.spikes) == 1 and int(fresh.spike_guard.position) == 9


def test_collapse_rollback_restores_the_best_checkpoint_in_place(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    best = tmp_path / "checkpoint-10"
    best.mkdir()
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(best / "model.safetensors"))
    torch.save(optimizer.state_dict(), best / "optimizer.pt")
    saved_weight = model.weight.detach().clone()
    saved_moment = optimizer.state[model.weight]["exp_avg"].clone()
    weight_pointer = model.weight.data_ptr()
    with torch.no_grad():
        model.weight.add_(5.0)
        optimizer.state[model.weight]["exp_avg"].add_(1.0)

    rollback = CollapseRollback("exact_match", ratio=0.5, max_rollbacks=1)
    scheduler = SimpleNamespace(base_lrs=[1e-3])
    state = SimpleNamespace(global_step=20, best_model_checkpoint=str(best), log_history=[])
    control = SimpleNamespace(should_training_stop=False)
    call = dict(model=model, optimizer=optimizer, lr_scheduler=scheduler)
    rollback.on_evaluate(None, state, control, metrics={"eval_exact_match": 0.8, "eval_loss": 1.0}, **call)
    assert rollback.rollbacks == 0 and rollback.best == 0.8
    rollback.on_evaluate(None, state, control, metrics={"eval_exact_match": 0.1, "eval_loss": 3.0}, **call)
    assert rollback.rollbacks == 1 and scheduler.base_lrs == [5e-4]
    assert torch.equal(model.weight, saved_weight) and model.weight.data_ptr() == weight_pointer
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], saved_moment)
    assert state.log_history[-1]["rollback"] == 1 and state.log_history[-1]["from_checkpoint"] == "checkpoint-10"
    # a second collapse after max_rollbacks stops the run; a non-finite eval loss counts as a collapse
    rollback.on_evaluate(None, state, control, metrics={"eval_exact_match": 0.8, "eval_loss": math.nan}, **call)
    assert control.should_training_stop and rollback.rollbacks == 1


def test_collapse_needs_a_real_best_and_loss_metrics_only_watch_finiteness():
    rollback = CollapseRollback("exact_match", ratio=0.5, min_best=0.2)
    assert rollback.collapsed({"eval_exact_match": 0.1}) is None  # best 0.1 < min_best: early noise, no collapse
    assert rollback.collapsed({"eval_exact_match": 0.04}) is None
    by_loss = CollapseRollback("loss")
    assert by_loss.collapsed({"eval_loss": 10.0}) is None and by_loss.collapsed({"eval_loss": 100.0}) is None
    assert "eval_loss" in by_loss.collapsed({"eval_loss": math.inf})
    resumed = CollapseRollback("exact_match")
    history = [{"eval_exact_match": 0.0, "step": 0}, {"eval_exact_match": 0.7, "step": 100},
               {"rollback": 1, "step": 200}, {"eval_exact_match": 0.6, "step": 300}]
    resumed.on_train_begin(None, SimpleNamespace(log_history=history), None)
    assert resumed.rollbacks == 1 and resumed.best == 0.7


def test_a_resumed_run_without_its_best_checkpoint_rolls_back_to_the_best_saved_one_or_stops(tmp_path):
    model = torch.nn.Linear(3, 2)
    good = model.weight.detach().clone()
    for step in (300, 400):  # what a resumed run keeps on disk: its newest checkpoints, not the best (step 100)
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({k: v + step for k, v in model.state_dict().items()},
                  str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    history = [{"eval_exact_match": 0.9, "step": 100}, {"eval_exact_match": 0.8, "step": 300},
               {"eval_exact_match": 0.6, "step": 400}]
    rollback = CollapseRollback("exact_match", ratio=0.5)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=500, best_model_checkpoint=None, log_history=history)
    rollback.on_train_begin(args, state, None)
    control = SimpleNamespace(should_training_stop=False)
    rollback.on_evaluate(args, state, control, metrics={"eval_exact_match": 0.1}, model=model)
    assert rollback.rollbacks == 1 and state.log_history[-1]["from_checkpoint"] == "checkpoint-300"
    assert torch.equal(model.weight, good + 300) and not control.should_training_stop
    # a checkpoint whose own value was collapsed (0.4 < 0.5 x 0.9) is no target: with none left the run stops
    history[1]["eval_exact_match"] = history[2]["eval_exact_match"] = 0.4
    rollback.on_evaluate(args, state, control, metrics={"eval_exact_match": 0.1}, model=model)
    assert control.should_training_stop and rollback.rollbacks == 1
    # the best checkpoint, when it is on disk, is the target whatever else is saved
    state.best_model_checkpoint = str(tmp_path / "checkpoint-400")
    assert rollback.rollback_target(args, state) == tmp_path / "checkpoint-400"
