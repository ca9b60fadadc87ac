"""Reliability of the experiment system, with real servers, Ray trainers and checkpoints.

  - A trainer actor killed mid-trial: the attempt is FAILED, attempt 2 runs on another
    actor, resumes from the trial's last checkpoint in the checkpoint service and ends
    bit-identical (curve, final metrics and a digest of the whole train state) to an
    uninterrupted run of the same trial.
  - The controller killed with SIGKILL mid-experiment and restarted on the same state
    directory: the experiment completes and every trial has exactly one result, and the
    restart consumes no attempt (max_attempts 1: the trial still runs to its result).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from integration_helpers import WORKLOAD, gated_storage, logged_port, spec

from batchlab.proto.v1 import common_pb2, controller_pb2, controller_pb2_grpc, experiment_pb2
from batchlab.rpc.checkpoint_client import CheckpointClient
from batchlab.rpc.client import channel
from services.controller.scheduler import RESTART_ERROR, attempt_assignment
from services.controller.server import Controller, ControllerConfig
from services.controller.storage import AttemptState, SQLiteStorage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = (controller_pb2.Experiment.SUCCEEDED, controller_pb2.Experiment.FAILED,
            controller_pb2.Experiment.CANCELLED)


def _submit(stub, data, request_id):
    return stub.SubmitExperiment(controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(data, experiment_pb2.ExperimentSpec()),
        request_id=request_id), timeout=30)


def _wait_for_end(stub, name, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = stub.GetExperiment(controller_pb2.GetExperimentRequest(name=name),
                                        timeout=10)
        if experiment.state in TERMINAL:
            return experiment
        time.sleep(0.2)
    raise AssertionError(f"{name} did not end in {timeout} s")


def test_killed_trainer_resumes_from_checkpoint_bit_identical(
        ray_cluster, tfds_dir, jax_cache_dir, checkpoint_server, tmp_path):
    import ray

    from services.trainer.actor import TrainerActor

    storage = gated_storage(tmp_path / "state", gate_step=20)
    config = ControllerConfig(
        port=0, metrics_port=None, state_dir=str(tmp_path / "state"), num_trainers=2,
        checkpoints_address=checkpoint_server.address, data_dir=tfds_dir,
        jax_cache_dir=jax_cache_dir, report_interval_s=0.0, poll_interval_s=0.1,
        workloads=(WORKLOAD,))
    controller = Controller(config, storage=storage)
    controller.start()
    try:
        with channel(controller.address) as chan:
            stub = controller_pb2_grpc.ExperimentServiceStub(chan)
            experiment = _submit(stub, spec(), "kill-1")
            experiment_id = experiment.name.split("/")[1]
            study_id = experiment.studies[0].name.rsplit("/", 1)[1]
            trial = f"{experiment.name}/studies/{study_id}/trials/0-r0"
            assert storage.reached.wait(180), "trial 0 never reached step 20"
            # Step 10's checkpoint is uploaded by the run's checkpoint thread, which may
            # still be at it; step 20's is not saved while its report is held.
            checkpoints = CheckpointClient(channel(checkpoint_server.address))
            deadline = time.monotonic() + 60
            while (saved := [c.step for c in checkpoints.list(trial)]) != [10]:
                assert saved == [] and time.monotonic() < deadline, saved
                time.sleep(0.05)
            (first,) = [a for a in storage.attempts(experiment_id)
                        if a.trial.trial_index == 0 and a.trial.replica == 0]
            ray.kill(controller.pool.actor_of(trial))
            storage.release.set()
            final = _wait_for_end(stub, experiment.name)
            assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
            trials = {t.name: t for t in stub.ListTrials(
                controller_pb2.ListTrialsRequest(parent=experiment.name), timeout=10).trials}
            assert trials[trial].attempt == 2
    finally:
        storage.release.set()
        controller.stop(grace=1.0)

    storage = SQLiteStorage(tmp_path / "state")
    attempts = [a for a in storage.attempts(experiment_id)
                if a.trial.trial_index == 0 and a.trial.replica == 0]
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "FAILED"), (2, "SUCCEEDED")]
    lost, resumed = attempts
    assert "lost" in lost.error and lost.worker == first.worker
    assert resumed.worker != first.worker
    assert resumed.result["resumed_from_step"] == 10

    # The same trial without interruption, on a fresh trainer with no checkpoints at all.
    study = controller.studies.get(storage.get_experiment(experiment_id))[0]
    reference_request = attempt_assignment(experiment_id, study, lost).SerializeToString()
    reference_actor = TrainerActor.options(num_cpus=0.5).remote(
        {"name": "reference", "data_dir": tfds_dir, "jax_cache_dir": jax_cache_dir})
    try:
        reference = ray.get(reference_actor.run.remote(reference_request), timeout=180)
    finally:
        ray.kill(reference_actor)
    storage.close()
    assert reference["outcome"] == "SUCCEEDED" and reference["resumed_from_step"] is None
    assert resumed.result["curve"] == reference["curve"]
    assert resumed.result["final_metrics"] == reference["final_metrics"]
    assert resumed.result["state_sha256"] == reference["state_sha256"]


def _start_controller(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """The controller on port 0; its address as it logged it (the log is appended to)."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller through the process
    process = subprocess.Popen(
        [sys.executable, "-m", "services.controller.server"], cwd=ROOT,
        env={**env, "BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_CONTROLLER_PORT": "0"},
        stdout=log, stderr=log)
    log.close()
    try:
        port = logged_port(log_path, "controller listening", process, after=offset)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, f"127.0.0.1:{port}"


def _wait_ready(stub, process, log_path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"controller exited {process.returncode}:\n"
                                 f"{log_path.read_text()[-4000:]}")
        try:
            stub.ListExperiments(controller_pb2.ListExperimentsRequest(), timeout=1)
            return
        except Exception:  # noqa: BLE001 - not serving yet
            time.sleep(0.2)
    raise AssertionError(f"controller not serving:\n{log_path.read_text()[-4000:]}")


def test_controller_sigkill_then_restart_completes_every_trial_once(
        ray_cluster, tfds_dir, jax_cache_dir, checkpoint_server, tmp_path):
    state_dir = tmp_path / "state"
    log_path = tmp_path / "controller.log"
    env = {
        **os.environ,
        "BATCHLAB_STATE_DIR": str(state_dir),
        "BATCHLAB_RAY_ADDRESS": ray_cluster,
        "BATCHLAB_NUM_TRAINERS": "2",
        "BATCHLAB_CHECKPOINTS_ADDR": checkpoint_server.address,
        "BATCHLAB_DATA_DIR": str(Path(tfds_dir).parent / "unused"),
        "BATCHLAB_METRICS_PORT": "0",
        "BATCHLAB_JAX_CACHE_DIR": jax_cache_dir,
        "BATCHLAB_REPORT_INTERVAL_SECONDS": "0",
        "BATCHLAB_WORKLOADS": WORKLOAD,
        "BATCHLAB_SHUTDOWN_GRACE_SECONDS": "1",
        # Trainers evaluate in their own process here (the evaluation service's path is
        # tested in test_services_path.py).
        "BATCHLAB_EVALUATION": "in-process",
    }
    # Trainers read the data from BATCHLAB_DATA_DIR/tfds: point a fresh folder's tfds at
    # the session's data.
    os.makedirs(env["BATCHLAB_DATA_DIR"], exist_ok=True)
    os.symlink(tfds_dir, Path(env["BATCHLAB_DATA_DIR"]) / "tfds")

    first, address = _start_controller(env, log_path)
    try:
        with channel(address) as chan:
            stub = controller_pb2_grpc.ExperimentServiceStub(chan)
            _wait_ready(stub, first, log_path)
            # One attempt per run: an attempt lost to the restart must not count.
            experiment = _submit(stub, spec(name="restart", max_attempts=1), "restart-1")
            deadline = time.monotonic() + 120
            killed_running = False
            while time.monotonic() < deadline:
                trials = stub.ListTrials(controller_pb2.ListTrialsRequest(
                    parent=experiment.name), timeout=10).trials
                if any(t.state == controller_pb2.Trial.ACTIVE and t.step >= 10
                       for t in trials):
                    killed_running = True
                    break
                time.sleep(0.05)
            assert killed_running, "no trial reported a step while running"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()

    second, address = _start_controller(env, log_path)
    try:
        with channel(address) as chan:
            stub = controller_pb2_grpc.ExperimentServiceStub(chan)
            _wait_ready(stub, second, log_path)
            final = _wait_for_end(stub, experiment.name)
            assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
            trials = stub.ListTrials(controller_pb2.ListTrialsRequest(
                parent=experiment.name), timeout=10).trials
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log_path.read_text()[-4000:]
    finally:
        if second.poll() is None:
            second.kill()

    storage = SQLiteStorage(state_dir)
    try:
        attempts = storage.attempts(experiment.name.split("/")[1])
    finally:
        storage.close()
    assert all(a.state is AttemptState.COMPLETED for a in attempts)
    results: dict = {}
    for attempt in attempts:
        if attempt.outcome in ("SUCCEEDED", "DIVERGED"):
            results.setdefault((attempt.trial.trial_index, attempt.trial.replica), []).append(
                attempt.attempt)
    assert sorted(results) == [(0, 0), (1, 0)]
    assert all(len(found) == 1 for found in results.values()), results
    restarted = [a for a in attempts if a.error == RESTART_ERROR]
    assert restarted, "the SIGKILL hit no running attempt"
    assert all(a.outcome == "FAILED" and a.failure == "CONTROLLER" for a in restarted)
    # The API tells the restart's attempts apart: not counted toward max_attempts.
    by_name = {t.name: t for t in trials}
    for attempt in restarted:
        trial = by_name[attempt.trial.name]
        assert trial.outcome == common_pb2.SUCCEEDED and trial.attempt == 2
        first = trial.attempts[0]
        assert (first.failure, first.counted) == (controller_pb2.FAILURE_CONTROLLER, False)
        assert trial.attempts[1].counted
