"""Evaluation reads a small split from disk once per process, not once per run."""

from __future__ import annotations

from batchlab.data import loaders
from batchlab.targets import Outcome
from batchlab.train import RunConfig, train_and_evaluate

OPTIMIZER = {"optimizer": "nesterov", "momentum": 0.9, "learning_rate": 0.1}


def test_runs_after_the_first_read_no_split_from_disk(tfds_dir, monkeypatch):
    def run(seed):
        config = RunConfig.for_trial("mnist1d_resnet1d_small", {"optimizer": OPTIMIZER}, batch_size=32,
                                     step_budget=2, eval_every_steps=2, seed=seed, data_dir=tfds_dir)
        return train_and_evaluate(config)

    first = run(0)
    reads = []
    real = loaders.get_dataset
    monkeypatch.setattr(loaders, "get_dataset", lambda *a, **k: reads.append(a[:2]) or real(*a, **k))
    second = run(1)
    assert first.outcome == second.outcome == Outcome.SUCCEEDED
    assert "validation/accuracy" in second.final_metrics and "train/accuracy" in second.final_metrics
    assert reads == []
