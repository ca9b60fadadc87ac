"""A multi-host trial: two Ray trainer actors as two JAX processes (jax.distributed, gloo CPU
collectives, coordinator on loopback), each feeding its shard of every batch, give the same
result as one process training alone; and the controller runs such a trial on a gang of
fresh trainers."""

from __future__ import annotations

import math
import time

import pytest
from integration_helpers import WORKLOAD, request, spec

pytestmark = pytest.mark.slow


def test_two_process_trial_matches_one_process(ray_cluster, tfds_dir, jax_cache_dir):
    import ray

    from services.trainer.actor import TrainerActor

    settings = {"data_dir": tfds_dir, "jax_cache_dir": jax_cache_dir}
    # BatchNorm over the whole batch: with virtual batches, which examples share a
    # normalisation group depends on how the hosts' shards are laid out in the global batch
    # (strided sharding interleaves them), so only whole-batch statistics are layout-free.
    # A decaying rate: at a constant 0.1 this tiny model is chaotic enough that last-bit
    # differences grow to about 3e-4 in 20 steps (at 0.01 or with this schedule they stay
    # near 1e-8), which would hide what this test checks.
    run = request(workload_hparams={"virtual_batch_size": 0},
                  learning_rate={"schedule": "cosine", "peak_value": 0.1})
    hosts = [TrainerActor.options(num_cpus=0.5).remote({**settings, "name": f"host-{i}"})
             for i in range(2)]
    alone = TrainerActor.options(num_cpus=0.5).remote({**settings, "name": "alone"})
    try:
        coordinator = ray.get(hosts[0].coordinator_address.remote(), timeout=60)
        host, port = coordinator.rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536  # Ray on loopback
        results = ray.get([actor.run_distributed.remote(run, i, 2, coordinator)
                           for i, actor in enumerate(hosts)], timeout=300)
        single = ray.get(alone.run.remote(run), timeout=300)
        # A JAX process joins one distributed system in its life: a second run is refused.
        with pytest.raises(ray.exceptions.RayTaskError, match="already joined"):
            ray.get(hosts[1].run_distributed.remote(run, 1, 2, coordinator), timeout=60)
    finally:
        for actor in [*hosts, alone]:
            ray.kill(actor)
    for result in results:
        assert result["outcome"] == "SUCCEEDED", result["error"]
    # Both processes end with the same replicated state and curve.
    assert results[0]["state_sha256"] == results[1]["state_sha256"]
    assert results[0]["curve"] == results[1]["curve"]
    assert single["outcome"] == "SUCCEEDED"
    assert [p["step"] for p in results[0]["curve"]] == [p["step"] for p in single["curve"]]
    # The same run as one process, up to float reassociation (the processes' partial sums
    # are added in another order than one device sums the whole batch): about 1e-8.
    for point, reference in zip(results[0]["curve"], single["curve"], strict=True):
        for key, value in reference.items():
            assert math.isclose(point[key], value, rel_tol=1e-6, abs_tol=1e-9), (point, key)


def test_controller_runs_a_multi_host_trial_on_a_gang_of_trainers(
        ray_cluster, tfds_dir, jax_cache_dir, tmp_path):
    from google.protobuf import json_format

    from batchlab.proto.v1 import controller_pb2, experiment_pb2
    from batchlab.rpc.testing import FakeContext
    from services.controller.server import Controller, ControllerConfig

    data = spec(name="gang", trials_per_study=1, max_total_trials=1,
                resources={"cpus": 0.5, "num_hosts": 2})
    data["workloads"][0]["hyperparameters"] = {"virtual_batch_size": 0}
    data["workloads"][0]["points"] = [{"batch_size": 32, "step_budget": 20}]
    config = ControllerConfig(
        port=0, metrics_port=None, state_dir=str(tmp_path / "state"), num_trainers=2,
        data_dir=tfds_dir, jax_cache_dir=jax_cache_dir, report_interval_s=0.0,
        poll_interval_s=0.1, workloads=(WORKLOAD,))
    controller = Controller(config)
    controller.start()
    try:
        experiment = controller.servicer.SubmitExperiment(
            controller_pb2.SubmitExperimentRequest(
                spec=json_format.ParseDict(data, experiment_pb2.ExperimentSpec())),
            FakeContext())
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            final = controller.servicer.GetExperiment(
                controller_pb2.GetExperimentRequest(name=experiment.name), FakeContext())
            if final.state not in (controller_pb2.Experiment.PENDING,
                                   controller_pb2.Experiment.RUNNING):
                break
            time.sleep(0.2)
        assert final.state == controller_pb2.Experiment.SUCCEEDED, final.error
        (attempt,) = controller.storage.attempts(experiment.name.split("/")[1])
        assert attempt.worker.count("+") == 1  # two trainers, one JAX process each
        assert attempt.result["outcome"] == "SUCCEEDED"
        # The gang's processes joined a distributed system: they were retired after it.
        assert controller.pool.counts() == {"idle": 0, "busy": 0}
    finally:
        controller.stop(grace=1.0)
