"""Runs in one process share jitted programs by program key, and nothing of another run leaks in.

A process trains run after run (a local runner's worker, a trainer actor). Runs whose
programs are the same, which differ only in optimizer values, seeds and data, reuse the
jitted functions of the first (batchlab.train.loop._PROGRAMS) instead of tracing and lowering
them again; a run's results must not depend on which run made them.
"""

from __future__ import annotations

from batchlab.train import loop, train_and_evaluate

OTHER_VALUES = {
    "optimizer": "nesterov",
    "learning_rate": {"schedule": "cosine", "peak_value": 0.05, "warmup_steps": 5},
    "momentum": 0.8,
}
OTHER_STRUCTURE = {"optimizer": "heavy_ball", "learning_rate": 0.05, "momentum": 0.9}


def test_runs_differing_only_in_optimizer_values_share_programs_and_others_do_not(make_config):
    first = loop._Run(make_config(), None)
    values = loop._Run(make_config(optimizer=OTHER_VALUES, seed=3), None)
    structure = loop._Run(make_config(optimizer=OTHER_STRUCTURE), None)
    batch = loop._Run(make_config(hyperparameters={"virtual_batch_size": 32}), None)
    assert values._programs is first._programs
    assert structure._programs is not first._programs
    assert batch._programs is not first._programs  # another model (virtual batch norm)
    assert values.eval_step is first.eval_step
    assert structure.eval_step is first.eval_step  # evaluation does not use the optimizer
    assert batch.eval_step is not first.eval_step


def test_a_key_shared_by_runs_whose_programs_differ_is_an_error(make_config):
    import pytest

    first = loop._Run(make_config(), None)
    loop._PROGRAMS[first.program_key].captured = ("another model",)
    with pytest.raises(RuntimeError, match="shared by runs whose programs differ"):
        loop._Run(make_config(), None)


def test_a_run_after_another_equals_the_same_run_with_no_programs_kept(make_config):
    loop._PROGRAMS.clear()
    alone = train_and_evaluate(make_config(optimizer=OTHER_VALUES, seed=2))
    loop._PROGRAMS.clear()
    train_and_evaluate(make_config())  # makes the programs, with its own values
    after = train_and_evaluate(make_config(optimizer=OTHER_VALUES, seed=2))
    assert after.curve == alone.curve
    assert after.final_metrics == alone.final_metrics
