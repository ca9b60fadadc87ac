"""Every service on the training path, with real servers on loopback and Ray trainers.

  - Evaluation as a service: a trial's evaluation points come from the evaluation service
    (the trainer saves a checkpoint at each point and trains on), and the numbers equal the
    trainer's own in-process evaluation of the same trial.
  - Data sharding as a service: a trial killed mid-run and resumed on another trainer reads
    exactly the examples an undisturbed run reads (example indices compared step by step);
    the hosts of a multi-host trial (a gang of fresh trainers, retired after it) read disjoint
    shards and resume from a checkpoint.
  - Placement: a run asking for resources no node has stays PENDING with the reason and
    ends unschedulable; nothing runs it elsewhere.
"""

from __future__ import annotations

import json
import time

import pytest
from fake_context import FakeContext
from google.protobuf import json_format
from integration_helpers import WORKLOAD, example_log, gated_storage, spec

from batchlab import data as bdata
from batchlab.proto.v1 import controller_pb2, experiment_pb2
from services.controller.scheduler import attempt_assignment
from services.controller.server import Controller, ControllerConfig
from services.controller.storage import AttemptState

pytestmark = pytest.mark.slow

TERMINAL = (controller_pb2.Experiment.SUCCEEDED, controller_pb2.Experiment.FAILED,
            controller_pb2.Experiment.CANCELLED)


def _config(tmp_path, tfds_dir, jax_cache_dir, **fields):
    values = dict(port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                  num_trainers=2, data_dir=tfds_dir, jax_cache_dir=jax_cache_dir,
                  report_interval_s=0.0, poll_interval_s=0.1, workloads=(WORKLOAD,),
                  example_log_dir=str(tmp_path / "examples"))
    values.update(fields)
    return ControllerConfig(**values)


def _submit(controller, data):
    return controller.servicer.SubmitExperiment(controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(data, experiment_pb2.ExperimentSpec())), FakeContext())


def _get(controller, name):
    return controller.servicer.GetExperiment(controller_pb2.GetExperimentRequest(name=name),
                                             FakeContext())


def _wait_for_end(controller, name, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = _get(controller, name)
        if experiment.state in TERMINAL:
            return experiment
        time.sleep(0.2)
    raise AssertionError(f"{name} did not end in {timeout} s")


def _reference(assignment: bytes, tfds_dir, jax_cache_dir, **settings):
    """The same trial on a fresh trainer: no services, evaluation in its own process."""
    import ray

    from services.trainer.actor import TrainerActor

    actor = TrainerActor.options(num_cpus=0.5).remote(
        {"name": "reference", "data_dir": tfds_dir, "jax_cache_dir": jax_cache_dir, **settings})
    try:
        return ray.get(actor.run.remote(assignment), timeout=300)
    finally:
        ray.kill(actor)


def _reference_examples(seed: int, steps: int, batch: int, hosts: int = 1) -> dict:
    """step -> host -> the examples an undisturbed run reads, from batchlab.data's own math."""
    size = len(bdata.get_dataset("mnist1d", "train", _tfds(), config="small"))
    streams = [bdata.ShardIterator(size, host, hosts, seed=seed) for host in range(hosts)]
    return {step: [s.take(batch // hosts)[0].tolist() for s in streams]
            for step in range(1, steps + 1)}


_TFDS: list[str] = []


def _tfds() -> str:
    return _TFDS[0]


@pytest.fixture(autouse=True)
def _remember_tfds(tfds_dir):
    _TFDS[:] = [tfds_dir]


def test_evaluation_points_come_from_the_evaluator_and_equal_in_process_evaluation(
        ray_cluster, tfds_dir, jax_cache_dir, checkpoint_server, sharding_server,
        evaluator_server, tmp_path):
    config = _config(tmp_path, tfds_dir, jax_cache_dir,
                     checkpoints_address=checkpoint_server.address,
                     sharding_address=sharding_server.address,
                     evaluator_address=evaluator_server.address)
    controller = Controller(config)
    controller.start()
    try:
        experiment = _submit(controller, spec(name="evaluated", trials_per_study=1,
                                              max_total_trials=1))
        final = _wait_for_end(controller, experiment.name)
        assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
        (attempt,) = controller.storage.attempts(experiment.name.split("/")[1])
        stored_points = controller.storage.trial_points(attempt.trial)
        study = controller.studies.get(controller.storage.get_experiment(
            attempt.trial.experiment_id))[0]
    finally:
        controller.stop(grace=1.0)

    assert attempt.outcome == "SUCCEEDED" and attempt.result["evaluated_by"] == "service"
    # Every point was evaluated by the evaluation service, at its exact step.
    answers = {step: metrics for trial, step, metrics in evaluator_server.recorded
               if trial == attempt.trial.name}
    assert sorted(answers) == [10, 20, 30]
    curve = attempt.result["curve"]
    assert [p["step"] for p in curve] == [10.0, 20.0, 30.0]
    for point in curve:
        for key, value in answers[int(point["step"])].items():
            assert point[key] == value, (point["step"], key)
    assert attempt.result["final_metrics"] == curve[-1]
    # The stored (and streamed) points carry the evaluator's numbers too.
    assert all(not p.awaiting_evaluation and "validation/accuracy" in p.values
               for p in stored_points)

    # The same trial evaluated in the trainer's own process gives the same numbers.
    in_process = attempt_assignment(attempt.trial.experiment_id, study, attempt)
    reference = _reference(in_process.SerializeToString(), tfds_dir, jax_cache_dir)
    assert reference["outcome"] == "SUCCEEDED"
    assert reference["state_sha256"] == attempt.result["state_sha256"]
    assert reference["curve"] == curve
    assert reference["steps_to_target"] == attempt.result["steps_to_target"]

    # The same spec through `batchlab local run` (a worker process with local run's thread
    # rule, no services) stores the same run: same seed, same hyperparameters, same numbers.
    from batchlab.runner import run_experiment

    out = run_experiment(spec(name="evaluated", trials_per_study=1, max_total_trials=1),
                         tmp_path / "local", data_dir=tfds_dir, progress=False,
                         write_report=False, parallel=1)
    (local_file,) = (out / "runs").glob("*/t0_r0_a1.json")
    local = json.loads(local_file.read_text())
    assert local["request"]["seed"] == attempt.seed
    assert local["request"]["hyperparameters"] == attempt.hyperparameters
    assert local["result"]["outcome"] == "SUCCEEDED"
    assert [p["step"] for p in local["result"]["curve"]] == [p["step"] for p in curve]
    for mine, theirs in zip(local["result"]["curve"], curve, strict=True):
        assert "validation/accuracy" in mine and "train/loss" in mine
        assert mine == theirs  # every metric of every point, not only those both have
    assert local["result"]["steps_to_target"] == attempt.result["steps_to_target"]


def _composed(logs, resumed_from: int, process: int = 0) -> dict[int, list[int]]:
    """The examples a killed attempt 1 and its resumed attempt 2 trained on, by step."""
    first, second = logs[(1, process)], logs[(2, process)]
    assert min(second) == resumed_from + 1
    return {**{s: ids for s, ids in first.items() if s <= resumed_from}, **second}


def test_a_killed_and_resumed_trial_reads_exactly_the_examples_of_an_undisturbed_run(
        ray_cluster, tfds_dir, jax_cache_dir, checkpoint_server, sharding_server,
        evaluator_server, tmp_path):
    import ray

    storage = gated_storage(tmp_path / "state", gate_step=20)
    config = _config(tmp_path, tfds_dir, jax_cache_dir,
                     checkpoints_address=checkpoint_server.address,
                     sharding_address=sharding_server.address,
                     evaluator_address=evaluator_server.address)
    controller = Controller(config, storage=storage)
    controller.start()
    try:
        experiment = _submit(controller, spec(name="resumed", trials_per_study=1,
                                              max_total_trials=1))
        experiment_id = experiment.name.split("/")[1]
        assert storage.reached.wait(240), "trial 0 never reported step 20"
        (first,) = storage.attempts(experiment_id)
        ray.kill(controller.pool.actor_of(first.trial.name))
        storage.release.set()
        final = _wait_for_end(controller, experiment.name)
        assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
        lost, resumed = storage.attempts(experiment_id)
        study = controller.studies.get(storage.get_experiment(experiment_id))[0]
    finally:
        storage.release.set()
        controller.stop(grace=1.0)

    assert (lost.outcome, lost.failure, resumed.outcome) == ("FAILED", "INFRASTRUCTURE",
                                                             "SUCCEEDED")
    # With evaluation by the service, the point is reported after its checkpoint is stored.
    assert resumed.result["resumed_from_step"] == 20
    logs = example_log(tmp_path / "examples", lost.trial.name)
    read = _composed(logs, 20)
    undisturbed = _reference_examples(lost.seed, 30, 32)
    assert read == {step: hosts[0] for step, hosts in undisturbed.items()}

    # An undisturbed run on a trainer computing its own shard reads the same and ends equal.
    reference = _reference(attempt_assignment(experiment_id, study, lost).SerializeToString(),
                           tfds_dir, jax_cache_dir, example_log_dir=str(tmp_path / "ref"))
    assert example_log(tmp_path / "ref", lost.trial.name)[(1, 0)] == read
    assert reference["state_sha256"] == resumed.result["state_sha256"]
    assert reference["curve"] == resumed.result["curve"]


def test_a_multi_host_trial_reads_disjoint_shards_and_resumes_from_a_checkpoint(
        ray_cluster, tfds_dir, jax_cache_dir, checkpoint_server, sharding_server, tmp_path):
    import ray

    storage = gated_storage(tmp_path / "state", gate_step=20)
    config = _config(tmp_path, tfds_dir, jax_cache_dir,
                     checkpoints_address=checkpoint_server.address,
                     sharding_address=sharding_server.address)
    data = spec(name="gang", trials_per_study=1, max_total_trials=1,
                resources={"cpus": 0.5, "num_hosts": 2})
    # Whole-batch BatchNorm: the hosts' strided shards interleave in the global batch.
    data["workloads"][0]["hyperparameters"] = {"virtual_batch_size": 0}
    controller = Controller(config, storage=storage)
    controller.start()
    try:
        experiment = _submit(controller, data)
        experiment_id = experiment.name.split("/")[1]
        assert storage.reached.wait(300), "the gang never reported step 20"
        (first,) = storage.attempts(experiment_id)
        # One host of the gang dies: the whole attempt is lost and retried on a new gang.
        ray.kill(controller.pool.actors_of(first.trial.name)[1])
        storage.release.set()
        final = _wait_for_end(controller, experiment.name, timeout=400)
        assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
        lost, resumed = storage.attempts(experiment_id)
        # A JAX process joins one distributed system in its life: both gangs were retired.
        assert controller.pool.counts() == {"idle": 0, "busy": 0}
    finally:
        storage.release.set()
        controller.stop(grace=1.0)

    assert lost.outcome == "FAILED" and resumed.outcome == "SUCCEEDED"
    assert resumed.worker.count("+") == 1 and resumed.worker != lost.worker
    # In-process evaluation reports before the checkpoint: the held report means step 20's
    # checkpoint may or may not be stored; the retry resumes from the newest one stored.
    resumed_from = resumed.result["resumed_from_step"]
    assert resumed_from in (10, 20)
    logs = example_log(tmp_path / "examples", lost.trial.name)
    undisturbed = _reference_examples(lost.seed, 30, 32, hosts=2)
    for host in (0, 1):
        read = _composed(logs, resumed_from, process=host)
        assert read == {step: hosts[host] for step, hosts in undisturbed.items()}
    for step in range(1, 31):
        ids = [logs[(2 if step > resumed_from else 1, host)][step] for host in (0, 1)]
        assert not set(ids[0]) & set(ids[1]), step  # disjoint shards
        assert len(set(ids[0]) | set(ids[1])) == 32
    assert resumed.result["curve"][-1]["step"] == 30


def test_a_run_no_node_can_hold_stays_pending_with_its_reason_then_fails_unschedulable(
        ray_cluster, tfds_dir, jax_cache_dir, tmp_path):
    config = _config(tmp_path, tfds_dir, jax_cache_dir, unschedulable_timeout_s=4.0)
    controller = Controller(config)
    controller.start()
    try:
        experiment = _submit(controller, spec(name="huge", resources={"cpus": 1, "gpus": 99}))
        deadline = time.monotonic() + 60
        pending = _get(controller, experiment.name)
        while not pending.pending_reason and time.monotonic() < deadline:
            time.sleep(0.1)
            pending = _get(controller, experiment.name)
        assert pending.state == controller_pb2.Experiment.PENDING
        assert "GPU 99" in pending.pending_reason, pending.pending_reason
        final = _wait_for_end(controller, experiment.name, timeout=120)
        trials = controller.servicer.ListTrials(controller_pb2.ListTrialsRequest(
            parent=experiment.name), FakeContext()).trials
        attempts = controller.storage.attempts(experiment.name.split("/")[1])
    finally:
        controller.stop(grace=1.0)
    assert final.state == controller_pb2.Experiment.FAILED
    assert final.error.startswith("unschedulable: ") and "GPU 99" in final.error
    assert trials[0].failure == controller_pb2.FAILURE_UNSCHEDULABLE
    # Never placed anywhere: no attempt ever became ACTIVE or had a trainer.
    assert all(a.start_time is None and not a.worker for a in attempts)
    assert {a.state for a in attempts} == {AttemptState.COMPLETED}
