"""The real controller on a free loopback port: Ray trainer actors train a small experiment.

One experiment, one study (mnist1d_resnet1d_small, batch 32, 20 steps): trial 0's learning
rate (1e6) diverges, so tuning goes on to trial 1, whose best run is rerun with a new seed.
"""

from __future__ import annotations

import math
import time

import grpc
import pytest
from controller_fakes import WORKLOAD, spec_dict
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchlab.proto.v1 import common_pb2, controller_pb2, controller_pb2_grpc, experiment_pb2
from batchlab.rpc.client import channel
from batchlab.search import expand_studies, load_spec
from services.controller.server import Controller, ControllerConfig

TOKEN = "test-token"

pytestmark = pytest.mark.slow


def real_spec() -> dict:
    """One of trials 0 and 1 diverges (lr 1e38), the other trains (lr 0.1); its rerun has a
    fresh seed. Which is which follows the study's Halton sequence (`_trials_by_rate`).

    BatchNorm keeps this model's loss finite for most huge rates (1e30 still trains); at
    1e38 the update overflows within three steps.
    """
    spec = spec_dict(name="real", trials_per_study=1, max_total_trials=2, seeds_per_best=1,
                     resources={"cpus": 1}, search_seed=0)  # seed 0: trial 0 draws 1e38
    spec["workloads"][0]["target"]["value"] = 0.05
    spec["optimizers"][0]["config"] = {"optimizer": "nesterov", "learning_rate": 0.1}
    spec["optimizers"][0]["search_space"] = {"parameters": [
        {"path": "optimizer.learning_rate", "discrete": {"values": [1e38, 0.1]}}]}
    return spec


@pytest.fixture
def controller(ray_cluster, tfds_dir, jax_cache_dir, tmp_path):
    """A started controller with two trainers and a shared checkpoint folder."""
    config = ControllerConfig(
        port=0, metrics_port=None, state_dir=str(tmp_path / "state"), num_trainers=2,
        checkpoint_dir=str(tmp_path / "checkpoints"), data_dir=tfds_dir,
        jax_cache_dir=jax_cache_dir, report_interval_s=0.0, auth_token=TOKEN,
        poll_interval_s=0.1, workloads=(WORKLOAD,))
    started = Controller(config)
    started.start()
    yield started
    started.stop(grace=1.0)


def _trials_by_rate() -> tuple[int, int]:
    """(the trial with lr 1e38, the trial with lr 0.1): base-2 stratification puts one of
    trials 0 and 1 in each half of the first dimension, so each value is drawn once."""
    (study,) = expand_studies(load_spec(real_spec()))
    rates = [study.hyperparameters(i)["optimizer"]["learning_rate"] for i in (0, 1)]
    return rates.index(1e38), rates.index(0.1)


def test_small_experiment_succeeds_over_grpc(controller):
    bad, good = _trials_by_rate()
    assert (bad, good) == (0, 1), "the test needs trial 0 to diverge: pick another search_seed"
    with channel(controller.address, token=TOKEN) as chan:
        stub = controller_pb2_grpc.ExperimentServiceStub(chan)
        health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        spec = json_format.ParseDict(real_spec(), experiment_pb2.ExperimentSpec())
        experiment = stub.SubmitExperiment(controller_pb2.SubmitExperimentRequest(
            spec=spec, request_id="real-1"), timeout=30)
        messages = list(stub.WatchExperiment(controller_pb2.WatchExperimentRequest(
            name=experiment.name, period_seconds=0.2), timeout=240))
        final = messages[-1].experiment
        assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
        assert (final.trial_counts.succeeded, final.trial_counts.diverged) == (2, 1)
        (study,) = final.studies
        assert (study.phase, study.best_trial) == ("done", good)
        assert study.aggregate.seeds == 1 and study.aggregate.diverged_trials == 1
        points = [p for m in messages for p in m.points]
        assert {p.trial.rsplit("/", 1)[1] for p in points} >= {f"{good}-r0", f"{good}-r1"}
        assert all(p.attempt == 1 for p in points)

        trials = {t.name.rsplit("/", 1)[1]: t for t in stub.ListTrials(
            controller_pb2.ListTrialsRequest(parent=experiment.name), timeout=30).trials}
        assert trials[f"{bad}-r0"].outcome == common_pb2.DIVERGED
        assert math.isinf(trials[f"{bad}-r0"].steps_to_target)
        for name in (f"{good}-r0", f"{good}-r1"):
            trial = trials[name]
            assert (trial.outcome, trial.step, trial.attempt) == (common_pb2.SUCCEEDED, 20, 1)
            assert trial.final_metrics["validation/accuracy"] > 0
            assert trial.worker.startswith("trainer-")
        assert trials[f"{good}-r0"].seed != trials[f"{good}-r1"].seed

        report = stub.GetReport(controller_pb2.GetReportRequest(name=experiment.name),
                                timeout=120)
        assert "real" in report.markdown and report.files

        with channel(controller.address) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                controller_pb2_grpc.ExperimentServiceStub(anonymous).GetExperiment(
                    controller_pb2.GetExperimentRequest(name=experiment.name), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cancel_stops_running_trainers(controller):
    spec = spec_dict(name="cancelled", trials_per_study=2, max_total_trials=2, seeds_per_best=0,
                     resources={"cpus": 1})
    spec["workloads"][0]["points"] = [{"batch_size": 32, "step_budget": 2000}]
    spec["optimizers"][0]["search_space"] = {"parameters": [
        {"path": "optimizer.learning_rate.peak_value", "fixed": {"value": 0.1}}]}
    with channel(controller.address, token=TOKEN) as chan:
        stub = controller_pb2_grpc.ExperimentServiceStub(chan)
        experiment = stub.SubmitExperiment(controller_pb2.SubmitExperimentRequest(
            spec=json_format.ParseDict(spec, experiment_pb2.ExperimentSpec())), timeout=30)
        for message in stub.WatchExperiment(controller_pb2.WatchExperimentRequest(
                name=experiment.name, period_seconds=0.1), timeout=120):
            if any(p.step >= 10 for p in message.points):
                break  # training is under way
        cancelled = stub.CancelExperiment(
            controller_pb2.CancelExperimentRequest(name=experiment.name), timeout=30)
        assert cancelled.state == controller_pb2.Experiment.CANCELLED
        for _ in range(600):
            trials = stub.ListTrials(controller_pb2.ListTrialsRequest(
                parent=experiment.name), timeout=10).trials
            if trials and all(t.state == controller_pb2.Trial.COMPLETED for t in trials):
                break
            time.sleep(0.1)
        assert {t.outcome for t in trials} == {common_pb2.CANCELLED}
        # Stopped early, after a checkpoint, not at the end of the 2,000-step budget.
        assert all(0 < t.step < 2000 for t in trials)


def test_the_controller_reads_the_common_server_settings_as_every_server_does():
    """Interface, ports, token and grace through batchlab.rpc.server.settings_from_env; the
    controller alone defaults to loopback."""
    from services.controller.server import ControllerConfig

    base = {"BATCHLAB_EVALUATION": "in-process"}
    config = ControllerConfig.from_env(base)
    assert (config.host, config.port, config.metrics_port, config.auth_token, config.grace_s) == (
        "127.0.0.1", 50051, 9101, "", 10.0)
    config = ControllerConfig.from_env({**base, "BATCHLAB_BIND_HOST": "0.0.0.0",
                                        "BATCHLAB_CONTROLLER_PORT": "7000",
                                        "BATCHLAB_AUTH_TOKEN": "t",
                                        "BATCHLAB_SHUTDOWN_GRACE_SECONDS": "3",
                                        "BATCHLAB_TRAINER_METRICS_PORT": "9300"})
    assert (config.host, config.port, config.auth_token, config.grace_s,
            config.trainer_metrics_port) == ("0.0.0.0", 7000, "t", 3.0, 9300)
    for variable, value in [("BATCHLAB_CONTROLLER_PORT", "99999"),
                            ("BATCHLAB_METRICS_PORT", "-1"),
                            ("BATCHLAB_TRAINER_METRICS_PORT", "abc"),
                            ("BATCHLAB_SHUTDOWN_GRACE_SECONDS", "soon")]:
        with pytest.raises(ValueError, match=variable):
            ControllerConfig.from_env({**base, variable: value})
    assert config.evaluate_timeout_s == 1800.0
    assert ControllerConfig.from_env(
        {**base, "BATCHLAB_EVALUATE_TIMEOUT_SECONDS": "120"}).evaluate_timeout_s == 120.0
    for value in ("0", "-5", "later", "inf", "nan", "1e10"):
        with pytest.raises(ValueError, match="BATCHLAB_EVALUATE_TIMEOUT_SECONDS must be"):
            ControllerConfig.from_env({**base, "BATCHLAB_EVALUATE_TIMEOUT_SECONDS": value})


def test_the_controllers_module_does_not_import_scipy():
    """`batchlab up` waits for the controller's start of Ray, which follows its imports;
    scipy.stats (used by the bootstrap verdicts' t interval, batchlab.search.compare) cost
    that start about 0.7 s of CPU when imported with the module."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, services.controller.server; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))"],
        check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
