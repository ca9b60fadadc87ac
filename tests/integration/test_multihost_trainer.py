"""A multi-host trial: two Ray trainer actors as two JAX processes (jax.distributed, gloo CPU
collectives, coordinator on loopback), each feeding its shard of every batch, give the same
result as one process training alone. The controller running such a trial on a gang of fresh
trainers (and a lost host) is tests/integration/test_services_path.py's multi-host test."""

from __future__ import annotations

import math

import pytest
from integration_helpers import request

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
