"""train_and_evaluate end to end on mnist1d 'small': curve, targets, outcomes, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from train_helpers import assert_batches_equal, stop_after

from batchlab.optim import learning_rate_fn
from batchlab.search.protocol import Outcome
from batchlab.train import Goal, Target, train_and_evaluate

EVAL_STEPS = [10, 20, 30]
METRICS = {
    "step",
    "learning_rate",
    "train/batch_loss",
    "train/loss",
    "train/accuracy",
    "validation/loss",
    "validation/accuracy",
}


# ------------------------------------------------------------------------------- end to end


def test_run_succeeds_with_a_curve_at_every_evaluation(baseline, make_config):
    result = baseline.result
    assert result.outcome is Outcome.SUCCEEDED
    assert result.error is None and result.diverged_step is None
    assert result.steps_completed == 30
    assert result.resumed_from_step is None
    assert [p["step"] for p in result.curve] == EVAL_STEPS
    for point in result.curve:
        assert set(point) == METRICS
        assert all(math.isfinite(v) for v in point.values()), point
        assert 0.0 <= point["train/accuracy"] <= 1.0 and 0.0 <= point["validation/accuracy"] <= 1.0
    # on_eval saw exactly the recorded points, as they were made.
    assert baseline.eval_points == result.curve
    assert result.final_metrics == result.curve[-1]
    assert result.train_time_s > 0 and result.examples_per_second > 0


def test_learning_rate_is_the_rate_of_the_step_just_taken(baseline, make_config):
    config = make_config()
    schedule = learning_rate_fn(config.optimizer, total_steps=config.total_steps)
    got = [p["learning_rate"] for p in baseline.result.curve]
    # Optax counts updates from 0: step s (1-based) used schedule(s - 1).
    assert got == pytest.approx([float(schedule(s - 1)) for s in EVAL_STEPS], rel=1e-6)
    assert got[0] > got[1] > got[2] > 0  # cosine decay after the 5 warm-up steps


def test_loss_decreases_from_the_start(baseline):
    curve, losses = baseline.result.curve, baseline.recorder.losses
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(10), abs=0.1)  # a fresh 10-way classifier
    assert np.mean(losses[-10:]) < losses[0] - 0.2
    for split in ("validation/loss", "train/loss"):
        values = [p[split] for p in curve]
        assert values[0] > values[1] > values[2], (split, values)
    assert curve[-1]["validation/accuracy"] > 0.15  # chance is 0.1
    # train/batch_loss is the mean training loss over the steps since the last evaluation.
    for i, point in enumerate(curve):
        window = losses[10 * i : 10 * (i + 1)]
        assert point["train/batch_loss"] == pytest.approx(float(np.mean(window)), rel=1e-12)


def test_the_loop_trains_on_full_batches_of_the_requested_size(baseline):
    batches = baseline.recorder.batches
    assert len(batches) == 30
    for batch in batches:
        assert batch["x"].shape == (64, 40) and batch["x"].dtype == np.float32
        assert batch["label"].shape == (64,)
    # 1,600 training examples make 25 batches of 64 an epoch: no example repeats within one.
    first_epoch = np.concatenate([b["x"] for b in batches[:25]])
    assert len(np.unique(first_epoch, axis=0)) == 25 * 64


# ---------------------------------------------------------------------------------- targets


def _first_step_meeting(curve, metric, value, goal):
    for point in curve:
        if (point[metric] >= value) if goal is Goal.MAXIMIZE else (point[metric] <= value):
            return int(point["step"])
    return math.inf


def test_unreachable_target_is_infinite(make_config, baseline):
    target = Target("validation/accuracy", 1.01, Goal.MAXIMIZE)
    result = train_and_evaluate(make_config(target=target))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.steps_to_target == math.inf
    assert result.to_dict()["steps_to_target"] is None
    assert result.curve == baseline.result.curve  # a target alone changes nothing


@pytest.mark.parametrize(
    ("metric", "goal", "at_step"),
    [("validation/accuracy", Goal.MAXIMIZE, 20), ("validation/loss", Goal.MINIMIZE, 20)],
)
def test_reachable_target_records_the_first_evaluation_meeting_it(make_config, baseline, metric, goal, at_step):
    curve = baseline.result.curve
    value = curve[EVAL_STEPS.index(at_step)][metric]
    expected = _first_step_meeting(curve, metric, value, goal)
    assert expected <= at_step
    result = train_and_evaluate(make_config(target=Target(metric, value, goal)))
    assert result.steps_to_target == expected
    assert result.to_dict()["steps_to_target"] == expected
    assert result.steps_completed == 30  # without stop_at_target the run goes on


def test_stop_at_target_ends_the_run_at_the_first_evaluation_meeting_it(make_config, baseline):
    curve = baseline.result.curve
    value = curve[1]["validation/accuracy"]
    expected = _first_step_meeting(curve, "validation/accuracy", value, Goal.MAXIMIZE)
    target = Target("validation/accuracy", value, Goal.MAXIMIZE)
    result = train_and_evaluate(make_config(target=target, stop_at_target=True))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.steps_to_target == expected
    assert result.steps_completed == expected < 30
    assert result.curve == curve[: EVAL_STEPS.index(expected) + 1]


# ----------------------------------------------------------------------- divergence, failure


def test_huge_learning_rate_diverges_at_the_first_non_finite_loss(make_config, recorder):
    # BatchNorm keeps this model's loss finite (if astronomical) for most huge rates; at 1e20
    # the second step's logits overflow.
    config = make_config(
        optimizer={"optimizer": "nesterov", "learning_rate": 1e20}, divergence_check_every=1
    )
    result = train_and_evaluate(config)
    first_bad = 1 + next(i for i, loss in enumerate(recorder.losses) if not math.isfinite(loss))
    assert result.outcome is Outcome.DIVERGED
    assert result.error is None
    assert result.diverged_step == first_bad
    assert result.steps_completed == first_bad == len(recorder.losses)  # it stopped there
    assert math.isfinite(recorder.losses[0])


def test_divergence_found_at_a_later_check_names_the_first_bad_step(make_config, recorder):
    # The loss is NaN from step 13; losses are fetched every 5 steps, so the run notices at
    # step 15 and reports step 13. No evaluation happens past the divergence.
    recorder.nan_loss_from_step = 13
    result = train_and_evaluate(make_config(divergence_check_every=5))
    assert result.outcome is Outcome.DIVERGED
    assert result.diverged_step == 13
    assert result.steps_completed == 15 == len(recorder.losses)
    assert [p["step"] for p in result.curve] == [10]
    assert result.to_dict()["outcome"] == "DIVERGED"


def test_exception_inside_training_is_failed_with_the_error_text(make_config, recorder):
    recorder.fail_at_batch = 14
    result = train_and_evaluate(make_config())
    assert result.outcome is Outcome.FAILED
    assert result.error == "RuntimeError: injected data failure at batch 14"
    assert result.steps_completed == 14
    assert [p["step"] for p in result.curve] == [10]
    assert result.diverged_step is None


def test_should_stop_cancels(make_config):
    result = train_and_evaluate(make_config(), should_stop=lambda: True)
    assert result.outcome is Outcome.CANCELLED
    assert result.steps_completed == 0 and result.curve == []
    assert result.error is None


def test_should_stop_mid_run_cancels_after_the_steps_taken(make_config, recorder, baseline):
    result = train_and_evaluate(make_config(), should_stop=stop_after(12))
    assert result.outcome is Outcome.CANCELLED
    assert result.steps_completed == 12 == len(recorder.batches)
    assert result.curve == baseline.result.curve[:1]


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_curves_and_batches(make_config, recorder, baseline):
    result = train_and_evaluate(make_config(seed=0))
    assert result.curve == baseline.result.curve
    assert recorder.losses == baseline.recorder.losses
    assert_batches_equal(recorder.batches, baseline.recorder.batches)


def test_different_seed_gives_different_data_and_curves(make_config, recorder, baseline):
    result = train_and_evaluate(make_config(seed=1))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.curve != baseline.result.curve
    other, base = recorder.batches, baseline.recorder.batches
    assert not np.array_equal(other[0]["x"], base[0]["x"])
    # The same examples in a different order: the seed permutes, it does not resample.
    def epoch(batches):
        return np.concatenate([b["x"] for b in batches[:25]])

    assert np.array_equal(np.unique(epoch(other), axis=0), np.unique(epoch(base), axis=0))
