"""Workload hyperparameters and RunConfig fields: bad values are ValueErrors naming the field.

They are raised by ``train_and_evaluate`` itself, before anything runs (not a FAILED run).
"""

from __future__ import annotations

import math

import pytest

from batchlab.train import Goal, Target, get_workload, train_and_evaluate, workload_names

SMALL = "mnist1d_resnet1d_small"


def test_registered_workloads():
    names = workload_names()
    assert SMALL in names and "imagenet_resnet50" in names and "mlm_tiny_bert" in names
    with pytest.raises(ValueError, match=r"^workload: unknown workload 'nope'; allowed: \["):
        get_workload("nope")


def test_defaults_and_overrides():
    w = get_workload(SMALL)
    assert w.hyperparameters(None) == {
        "label_smoothing": 0.0,
        "gamma_0": 1.0,
        "virtual_batch_size": 16,
        "bn_momentum": 0.9,
        "bn_epsilon": 1e-5,
        "train_examples": 0,
        "microbatch_size": 0,
    }
    # JSON numbers arrive as floats: integral ones are fine where an integer is required.
    hp = w.hyperparameters({"virtual_batch_size": 32.0, "label_smoothing": 0.1, "gamma_0": 0})
    assert hp["virtual_batch_size"] == 32 and isinstance(hp["virtual_batch_size"], int)
    assert hp["label_smoothing"] == 0.1 and hp["gamma_0"] == 0.0 and isinstance(hp["gamma_0"], float)
    # null (or 0) virtual batch: normalise over the whole device batch.
    assert w.hyperparameters({"virtual_batch_size": None})["virtual_batch_size"] is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lable_smoothing": 0.1}, "workload.lable_smoothing"),
        ({"label_smoothing": 1.0}, "workload.label_smoothing"),
        ({"label_smoothing": -0.1}, "workload.label_smoothing"),
        ({"label_smoothing": math.nan}, "workload.label_smoothing"),
        ({"label_smoothing": "0.1"}, "workload.label_smoothing"),
        ({"label_smoothing": True}, "workload.label_smoothing"),
        ({"gamma_0": None}, "workload.gamma_0"),
        ({"gamma_0": math.inf}, "workload.gamma_0"),
        ({"virtual_batch_size": 2.5}, "workload.virtual_batch_size"),
        ({"virtual_batch_size": -16}, "workload.virtual_batch_size"),
        ({"bn_momentum": 1.0}, "workload.bn_momentum"),
        ({"bn_epsilon": 0.0}, "workload.bn_epsilon"),
    ],
)
def test_bad_workload_hyperparameters_name_the_field(make_config, overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        get_workload(SMALL).hyperparameters(overrides)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        train_and_evaluate(make_config(hyperparameters=overrides))


def test_unknown_hyperparameter_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"workload\.dropout_rate: unknown hyperparameter") as err:
        get_workload(SMALL).hyperparameters({"dropout_rate": 0.1})
    assert "label_smoothing" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dropout_rate": 1.0}, "workload.dropout_rate"),
        ({"max_seq_length": 4}, "workload.max_seq_length"),
        ({"max_predictions_per_seq": 0}, "workload.max_predictions_per_seq"),
        ({"label_smoothing": 0.1}, "workload.label_smoothing"),
    ],
)
def test_bad_mlm_hyperparameters_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        get_workload("mlm_tiny_bert").hyperparameters(overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, r"^batch_size: must be a positive integer"),
        ({"batch_size": -64}, r"^batch_size: must be a positive integer"),
        ({"batch_size": 64.0}, r"^batch_size: must be a positive integer"),
        ({"batch_size": True}, r"^batch_size: must be a positive integer"),
        ({"batch_size": 40}, r"^batch_size: the per-device batch 40 is not a multiple of virtual_batch_size 16"),
        ({"total_steps": 0}, r"^total_steps: must be a positive integer"),
        ({"total_steps": "30"}, r"^total_steps: must be a positive integer"),
        ({"eval_every_steps": 0}, r"^eval_every_steps: must be a positive integer"),
        ({"divergence_check_every": -1}, r"^divergence_check_every: must be a positive integer"),
        ({"seed": -1}, r"^seed: must be an integer >= 0"),
        ({"workload": "nope"}, r"^workload: unknown workload"),
        ({"optimizer": {"optimizer": "sgd"}}, r"^optimizer\.learning_rate: required"),
        ({"optimizer": {"optimizer": "nesterov", "learning_rate": 0.1, "momentun": 0.9}}, r"^optimizer\.momentun: unknown"),
        ({"target": Target("validation/accuracy", 0.5, "MAXIMIZE")}, r"^target\.goal: must be a Goal"),
        ({"stop_at_target": True}, r"^stop_at_target: needs a target"),
    ],
)
def test_bad_run_config_raises_before_anything_runs(make_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(make_config(**overrides))


def test_a_goal_given_as_a_goal_is_accepted(make_config):
    config = make_config(target=Target("validation/loss", 1.0, Goal.MINIMIZE), stop_at_target=True)
    workload, hp = config.validate()
    assert workload.name == SMALL and hp["virtual_batch_size"] == 16
