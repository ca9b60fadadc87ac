"""Checkpoint and resume: an interrupted run, resumed, ends bit-identical to an uninterrupted one.

The reference is the session's baseline run (30 steps, evaluated and checkpointed at 10, 20,
30). Each test interrupts the same configuration in a fresh checkpoint folder, resumes it with a
new ``train_and_evaluate`` call, and compares the final TrainState leaf by leaf with
``np.array_equal``, the curve exactly, and the training batches fed after the resume.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from train_helpers import Recorder, assert_batches_equal, assert_trees_equal, stop_after

from batchlab.search.protocol import Outcome
from batchlab.train import train_and_evaluate
from batchlab.train.checkpoint import RunCheckpointer


def _run(config, *, fail_at_batch=None, **kwargs):
    """One session of a run, recording the batches it trains on."""
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(fail_at_batch=fail_at_batch).patch(mp)
        result = train_and_evaluate(config, return_state=True, **kwargs)
    return result, rec


def _checkpoint(directory, abstract_state, step=None):
    ckpt = RunCheckpointer(directory)
    try:
        return ckpt.latest_step(), *ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()


def test_baseline_final_checkpoint_holds_the_final_state(baseline):
    state = baseline.result.final_state
    assert int(state.step) == 30
    latest, restored, meta = _checkpoint(baseline.checkpoint_dir, state)
    assert latest == 30
    assert_trees_equal(restored, state)
    assert meta["step"] == 30 and meta["curve"] == baseline.result.curve
    assert meta["window_losses"] == []


def test_cancelled_mid_window_then_resumed_is_bit_identical(make_config, baseline, tmp_path):
    """should_stop after 15 steps (between evaluations) saves a checkpoint; the resume finishes."""
    config = make_config(checkpoint_dir=str(tmp_path))
    first, rec1 = _run(config, should_stop=stop_after(15))
    assert first.outcome is Outcome.CANCELLED
    assert first.steps_completed == 15
    assert first.curve == baseline.result.curve[:1]
    latest, _, meta = _checkpoint(tmp_path, first.final_state)
    assert latest == 15
    assert len(meta["window_losses"]) == 5  # steps 11-15, for step 20's train/batch_loss

    second, rec2 = _run(config)
    assert second.outcome is Outcome.SUCCEEDED
    assert second.resumed_from_step == 15
    assert second.steps_completed == 30
    assert second.curve == baseline.result.curve
    assert_trees_equal(second.final_state, baseline.result.final_state)
    # The data resumed where it stopped: batches 0-14, then 15-29, as uninterrupted.
    assert_batches_equal(rec1.batches + rec2.batches, baseline.recorder.batches)
    # And the saved final checkpoints agree too.
    _, final_b, _ = _checkpoint(tmp_path, second.final_state)
    _, final_a, _ = _checkpoint(baseline.checkpoint_dir, baseline.result.final_state)
    assert_trees_equal(final_b, final_a)


def test_cancelled_right_after_an_evaluation_then_resumed(make_config, baseline, tmp_path):
    """Cancelling at a step already saved (an evaluation step, or at once after a resume)."""
    config = make_config(checkpoint_dir=str(tmp_path))
    first, rec1 = _run(config, should_stop=stop_after(20))
    assert first.outcome is Outcome.CANCELLED, first.error
    assert first.steps_completed == 20

    again, rec_again = _run(config, should_stop=lambda: True)
    assert again.outcome is Outcome.CANCELLED, again.error
    assert again.resumed_from_step == 20 and again.steps_completed == 20
    assert rec_again.batches == []

    last, rec2 = _run(config)
    assert last.outcome is Outcome.SUCCEEDED
    assert last.curve == baseline.result.curve
    assert_trees_equal(last.final_state, baseline.result.final_state)
    assert_batches_equal(rec1.batches + rec2.batches, baseline.recorder.batches)


def test_crashed_run_resumes_from_its_last_checkpoint(make_config, baseline, tmp_path):
    """An exception at step 26 (FAILED, nothing saved) resumes from the step-20 checkpoint."""
    config = make_config(checkpoint_dir=str(tmp_path))
    crashed, rec1 = _run(config, fail_at_batch=25)
    assert crashed.outcome is Outcome.FAILED
    assert "injected data failure at batch 25" in crashed.error
    assert crashed.steps_completed == 25
    assert [p["step"] for p in crashed.curve] == [10, 20]

    resumed, rec2 = _run(config)
    assert resumed.outcome is Outcome.SUCCEEDED
    assert resumed.resumed_from_step == 20
    assert resumed.curve == baseline.result.curve
    assert_trees_equal(resumed.final_state, baseline.result.final_state)
    assert_batches_equal(rec2.batches, baseline.recorder.batches[20:])


def test_a_finished_run_resumed_does_nothing_more(baseline, make_config):
    result, rec = _run(make_config(checkpoint_dir=baseline.checkpoint_dir))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.resumed_from_step == 30 and result.steps_completed == 30
    assert rec.batches == []
    assert result.curve == baseline.result.curve
    assert_trees_equal(result.final_state, baseline.result.final_state)


# Writes a replicated state the way RunCheckpointer did before 2026-12-01 (orbax, jax.Arrays
# on every device of this process), or restores it with RunCheckpointer; prints the result.
_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
import orbax.checkpoint as ocp
from batchlab.train.checkpoint import RunCheckpointer
from batchlab.train.parallel import DataParallel
mode, folder = sys.argv[1], sys.argv[2]
dp = DataParallel()
state = dp.put_replicated({"step": np.int32(5), "rng": np.array([1, 2], np.uint32),
                           "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}})
if mode == "save":
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=True))
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"step": 7})))
    manager.wait_until_finished()
    manager.close()
    print(json.dumps({"devices": jax.device_count()}))
else:
    checkpointer = RunCheckpointer(folder)
    restored, meta = checkpointer.restore(state)
    checkpointer.close()
    restored = dp.put_replicated(restored)
    print(json.dumps({"devices": jax.device_count(), "meta": meta,
                      "w": np.asarray(restored["params"]["w"]).tolist(),
                      "rng": np.asarray(restored["rng"]).tolist()}))
"""


def test_a_checkpoint_of_jax_arrays_from_two_devices_restores_on_one(tmp_path):
    """Checkpoints written as jax.Arrays name the devices that wrote them: a trial resumed
    on a trainer with another device count must still read them (as numpy, then placed)."""
    import json
    import os
    import subprocess
    import sys

    def child(mode, devices):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, mode, str(tmp_path / "c")],
                             env=env, check=True, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert child("save", 2)["devices"] == 2
    got = child("restore", 1)
    assert got == {"devices": 1, "meta": {"step": 7}, "w": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
                   "rng": [1, 2]}


def test_training_goes_on_while_a_checkpoint_is_handed_on(make_config, baseline, tmp_path):
    """on_checkpoint runs in the run's checkpoint thread: while step 10's is held (a slow
    upload), training reaches step 20's evaluation; the calls come in step order and have all
    returned when the run does; and step 20's checkpoint, written after training had gone on
    (donating the state's buffers), holds step 20's state."""
    reached_20 = threading.Event()
    calls = []

    def on_eval(point):
        if point["step"] == 20:
            reached_20.set()

    def on_checkpoint(step, directory):
        waited = reached_20.wait(timeout=120) if step == 10 else None
        calls.append((step, threading.current_thread() is threading.main_thread(), waited))
        shutil.copytree(Path(directory) / str(step), tmp_path / "copies" / str(step))

    result, _ = _run(make_config(checkpoint_dir=str(tmp_path / "run")), on_eval=on_eval,
                     on_checkpoint=on_checkpoint)
    assert result.outcome is Outcome.SUCCEEDED, result.error
    assert calls == [(10, False, True), (20, False, None), (30, False, None)]
    assert_trees_equal(result.final_state, baseline.result.final_state)
    _, ours, meta = _checkpoint(tmp_path / "copies", baseline.result.final_state, 20)
    _, theirs, _ = _checkpoint(baseline.checkpoint_dir, baseline.result.final_state, 20)
    assert int(ours.step) == 20 and meta["curve"] == baseline.result.curve[:2]
    assert_trees_equal(ours, theirs)


@pytest.mark.parametrize("failing_step", [10, 30])
def test_a_failed_checkpoint_job_fails_the_run_with_its_error(make_config, tmp_path,
                                                              failing_step):
    """An error of on_checkpoint (e.g. an upload that failed for good) reaches the training
    thread: the run is FAILED with it, as an infrastructure failure when the error says so,
    whether training had gone on (step 10) or was over (step 30); and no later checkpoint is
    handed on after a lost one (a resume from it would have a curve point with no checkpoint)."""

    class UploadLost(RuntimeError):
        infrastructure = True

    calls = []
    next_point = threading.Event()

    def on_eval(point):
        if point["step"] == failing_step + 10:
            next_point.set()

    def on_checkpoint(step, directory):
        calls.append(step)
        if step == failing_step:
            # Failing for good takes retries: training reaches the next point meanwhile.
            if failing_step < 30:
                assert next_point.wait(timeout=120)
            raise UploadLost(f"upload of step {step} failed")

    result, _ = _run(make_config(checkpoint_dir=str(tmp_path)), on_eval=on_eval,
                     on_checkpoint=on_checkpoint)
    assert result.outcome is Outcome.FAILED
    assert result.error == f"UploadLost: upload of step {failing_step} failed"
    assert result.failure == "infrastructure"
    assert calls == [s for s in (10, 20, 30) if s <= failing_step]
