"""The trainer's parts without Ray: progress batching, shared-folder checkpoints, resources,
settings and metrics. (Training on Ray actors is tested in tests/integration.)"""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

import grpc
import pytest

from batchlab.proto.v1 import controller_pb2
from services.trainer.actor import (
    ProgressReporter,
    TrainerWorker,
    actor_options,
    trainer_settings,
)
from services.trainer.checkpoint_sync import DirectoryCheckpointSync

TRIAL = "experiments/e/studies/s.b32/trials/0-r0"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        super().__init__(code.name)
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return self._code.name


class FakeStub:
    """ReportProgress that records requests, fails as told, and answers cancel as told."""

    def __init__(self):
        self.requests = []
        self.fail_with = None
        self.cancel = False

    def ReportProgress(self, request, timeout=None):
        if self.fail_with is not None:
            raise FakeRpcError(self.fail_with)
        self.requests.append(request)
        return controller_pb2.ReportProgressResponse(cancel=self.cancel)


def test_progress_is_batched_by_interval_and_kept_when_the_controller_is_away():
    now = [0.0]
    stub = FakeStub()
    reporter = ProgressReporter(stub, TRIAL, 2, interval_s=10.0, clock=lambda: now[0])
    reporter.add({"step": 10.0, "validation/accuracy": 0.5})  # first call: sent at once
    reporter.add({"step": 20.0, "validation/accuracy": 0.6})
    reporter.add({"step": 30.0, "validation/accuracy": float("nan")})
    assert [len(r.points) for r in stub.requests] == [1]
    stub.fail_with = grpc.StatusCode.UNAVAILABLE
    assert not reporter.flush()  # kept for the next call
    stub.fail_with = None
    stub.cancel = True
    assert reporter.flush() and reporter.cancelled
    sent = stub.requests[-1].points
    assert [(p.trial, p.attempt, p.step) for p in sent] == [(TRIAL, 2, 20), (TRIAL, 2, 30)]
    assert "step" not in sent[0].values
    # A refusal for good drops the points instead of resending them forever.
    reporter.add({"step": 40.0})
    stub.fail_with = grpc.StatusCode.NOT_FOUND
    reporter.flush()
    stub.fail_with = None
    count = len(stub.requests)
    reporter.flush()
    assert len(stub.requests) == count
    assert ProgressReporter(None, TRIAL, 1).flush() is False  # no controller: nothing sent


def test_directory_sync_uploads_atomically_keeps_the_newest_and_restores(tmp_path):
    sync = DirectoryCheckpointSync(tmp_path / "shared", keep=2)
    assert sync.restore(TRIAL, tmp_path / "empty") is None
    for step in (10, 20, 30):
        folder = tmp_path / "local" / str(step)
        (folder / "state").mkdir(parents=True)
        (folder / "state" / "data").write_text(f"step {step}")
        sync.upload(TRIAL, step, folder, metric=0.1 * step)
    sync.upload(TRIAL, 30, tmp_path / "local" / "30")  # the same step again: a no-op
    stored = tmp_path / "shared" / TRIAL
    assert sorted(p.name for p in stored.iterdir()) == ["20", "30"]
    target = tmp_path / "attempt-2"
    assert sync.restore(TRIAL, target) == 30
    assert (target / "30" / "state" / "data").read_text() == "step 30"
    with pytest.raises(ValueError, match="trial"):
        sync.restore("experiments/../../etc", target)


def test_actor_options_from_resources():
    assert actor_options(None) == {"num_cpus": 1.0}
    # One host's share: gpus and tpus count the run (split over num_hosts), cpus and memory
    # are per host (experiment.proto, Resources).
    assert actor_options({"cpus": 4, "gpus": 2, "tpus": 8, "memory_gib": 2, "num_hosts": 2}) == {
        "num_cpus": 4.0, "num_gpus": 1, "resources": {"TPU": 4}, "memory": 2 * 2**30}
    assert actor_options({"tpus": 128, "num_hosts": 32}) == {"num_cpus": 1.0,
                                                             "resources": {"TPU": 4}}
    assert actor_options({"gpus": 8, "num_hosts": 1}) == {"num_cpus": 1.0, "num_gpus": 8}
    with pytest.raises(ValueError, match=r"resources\.tpus"):
        actor_options({"tpus": 6, "num_hosts": 4})


def test_settings_are_the_proto_message_and_refuse_unknown_keys_and_wrong_kinds():
    settings = trainer_settings({"name": "t", "metrics_port": 0})
    assert settings.name == "t" and settings.HasField("metrics_port") and settings.metrics_port == 0
    assert not trainer_settings(None).HasField("metrics_port")  # no metrics endpoint
    with pytest.raises(ValueError, match="contoller_address"):
        trainer_settings({"contoller_address": "x"})
    with pytest.raises(ValueError, match="metrics_port"):
        trainer_settings({"metrics_port": "abc"})


def test_the_controller_hands_trainers_settings_they_parse(tmp_path):
    """Both sides read the one declaration: what the controller builds, a trainer accepts."""
    from services.controller.server import Controller, ControllerConfig

    controller = Controller(ControllerConfig(
        port=0, metrics_port=None, state_dir=str(tmp_path / "state"), data_dir="/data",
        report_interval_s=0.5, trainer_metrics_port=9300, workloads=("mnist1d_resnet1d_small",)))
    try:
        handed = controller.trainer_settings()
    finally:
        controller.stop(grace=0)
    settings = trainer_settings({**handed, "name": "trainer-0"})
    assert (settings.data_dir, settings.report_interval_s, settings.metrics_port,
            settings.metrics_host) == ("/data", 0.5, 9300, "127.0.0.1")
    assert settings.checkpoint_root.endswith("state/checkpoints")  # a local Ray shares the disk
    worker = TrainerWorker({**handed, "name": "trainer-0", "metrics_port": None,
                            "work_dir": str(tmp_path / "w")})
    assert (worker.name, worker._report_interval_s, worker._metrics_port) == ("trainer-0", 0.5, None)


def test_trainer_exports_metrics_of_a_running_trial(tmp_path):
    worker = TrainerWorker({"name": "t", "metrics_port": 0, "work_dir": str(tmp_path),
                            "jax_cache_dir": str(tmp_path / "cache")})
    try:
        port = worker.info()["metrics_port"]
        series = worker._metrics.trainer.trial("e", "s", "0-r0")
        last = {"step": 0, "time": 0.0}
        worker._observe(series, {"step": 10.0, "learning_rate": 0.1, "train/batch_loss": 2.0,
                                 "validation/accuracy": 0.5}, last, 32)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = text.decode()
        assert 'batchlab_trial_step{experiment="e",study="s",trial="0-r0"} 10.0' in text
        assert "batchlab_trainer_steps_total 10.0" in text
        series.remove()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'trial="0-r0"' not in text
    finally:
        worker.shutdown()


def _assignment(**fields):
    import json

    from batchlab.proto.v1 import experiment_pb2

    values = dict(trial=TRIAL, attempt=1, workload="mnist1d_resnet1d_small",
                  hyperparameters_json=json.dumps({"optimizer": {"optimizer": "nesterov",
                                                                 "warmup_steps": 5}}),
                  batch_size=32, step_budget=20, eval_every_steps=10, seed=3,
                  target=experiment_pb2.Target(metric="validation/accuracy", value=0.5,
                                               goal=2, reading=2))
    values.update(fields)
    return controller_pb2.TrialAssignment(**values)


def test_an_assignment_round_trips_and_keeps_integer_hyperparameters():
    from batchlab.search.study import Goal, TargetReading
    from services.trainer.actor import build_run_config, hyperparameters_of, parse_assignment

    assignment = parse_assignment(_assignment().SerializeToString())
    assert isinstance(hyperparameters_of(assignment)["optimizer"]["warmup_steps"], int)
    config = build_run_config(assignment, data_dir=None, checkpoint_dir=None)
    assert (config.batch_size, config.total_steps, config.eval_every_steps, config.seed) == (
        32, 20, 10, 3)
    assert config.target.goal is Goal.MINIMIZE
    assert config.target.reading is TargetReading.END_OF_BUDGET


@pytest.mark.parametrize("fields, message", [
    ({"trial": ""}, "assignment.trial"),
    ({"batch_size": 0}, "assignment.batch_size"),
    ({"hyperparameters_json": ""}, "assignment.hyperparameters_json"),
])
def test_a_bad_assignment_names_the_field(fields, message):
    from services.trainer.actor import parse_assignment

    with pytest.raises(ValueError, match=message):
        parse_assignment(_assignment(**fields).SerializeToString())
    with pytest.raises(ValueError, match="serialized"):
        parse_assignment({"trial": TRIAL})


def test_points_awaiting_evaluation_say_so():
    stub = FakeStub()
    reporter = ProgressReporter(stub, TRIAL, 1, interval_s=0.0)
    reporter.add({"step": 10.0, "train/batch_loss": 1.5}, awaiting_evaluation=True)
    reporter.add({"step": 20.0, "validation/accuracy": 0.5})
    assert [p.awaiting_evaluation for r in stub.requests for p in r.points] == [True, False]


def test_evaluation_by_the_service_needs_the_checkpoint_service(tmp_path):
    from services.trainer.actor import TrainerInfrastructureError

    worker = TrainerWorker({"name": "t", "work_dir": str(tmp_path),
                            "checkpoint_root": str(tmp_path / "shared"),
                            "jax_cache_dir": str(tmp_path / "cache")})
    with pytest.raises(TrainerInfrastructureError, match="checkpoint service") as info:
        worker.run(_assignment(evaluation=controller_pb2.EVALUATION_SERVICE).SerializeToString())
    assert info.value.infrastructure


def test_a_tpu_host_says_its_slice_and_worker_id_and_runs_only_as_that_process(
        tmp_path, monkeypatch):
    """GKE's Ray TPU webhook numbers a slice's pods (TPU_WORKER_ID) and names the slice
    (TPU_NAME, "<group>-<replica>"); JAX's process id on that host must be its worker id."""
    from services.trainer.actor import tpu_worker_id

    assert tpu_worker_id({}) is None
    assert tpu_worker_id({"TPU_WORKER_ID": "31"}) == 31
    with pytest.raises(ValueError, match="TPU_WORKER_ID"):
        tpu_worker_id({"TPU_WORKER_ID": "-1"})
    worker = TrainerWorker({"name": "t", "work_dir": str(tmp_path),
                            "jax_cache_dir": str(tmp_path / "cache")})
    monkeypatch.delenv("TPU_WORKER_ID", raising=False)
    assert worker.tpu_host() == {"worker_id": None, "slice": None}
    monkeypatch.setenv("TPU_WORKER_ID", "5")
    monkeypatch.setenv("TPU_NAME", "tpu-v5p-4x4x8-1")
    assert worker.tpu_host(True) == {"worker_id": 5, "slice": "tpu-v5p-4x4x8-1"}
    with pytest.raises(ValueError, match="TPU_WORKER_ID 5"):
        worker.run_distributed(_assignment().SerializeToString(), 4, 32, "127.0.0.1:1")
    assert not worker._distributed  # refused before joining any distributed system


def test_a_run_leaves_no_scratch_and_shutdown_removes_only_a_temporary_idle_folder(
        tmp_path, monkeypatch):
    import batchlab.train

    def train_and_fail(config, **kwargs):
        # A run writes its checkpoints under <work dir>/<trial>/attempt-<n>, then fails.
        (Path(config.checkpoint_dir) / "0").mkdir(parents=True)
        raise RuntimeError("the run failed")

    monkeypatch.setattr(batchlab.train, "train_and_evaluate", train_and_fail)
    settings = {"checkpoint_root": str(tmp_path / "shared"), "jax_cache_dir": str(tmp_path / "cache")}
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    idle = TrainerWorker({"name": "t", **settings})
    # A trainer that never runs makes no folder: killed without shutdown, it leaves none.
    assert list(temp.iterdir()) == []
    idle.shutdown()
    assert list(temp.iterdir()) == []
    worker = TrainerWorker({"name": "t", **settings})
    with pytest.raises(RuntimeError, match="the run failed"):
        worker.run(_assignment().SerializeToString())
    [scratch] = temp.iterdir()
    assert scratch.is_dir() and scratch.name.startswith("batchlab-trainer-")
    assert list(scratch.iterdir()) == []  # neither the attempt's folder nor the trial's
    worker._busy.acquire()  # a run in flight: its folder stays
    worker.shutdown()
    assert scratch.is_dir()
    worker._busy.release()
    worker.shutdown()
    assert not scratch.exists()

    (tmp_path / "work").mkdir()
    configured = TrainerWorker({"name": "t", "work_dir": str(tmp_path / "work"), **settings})
    configured.shutdown()
    assert (tmp_path / "work").is_dir()  # a folder the settings name is not the worker's
