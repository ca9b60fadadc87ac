"""The services under load: 32 clients calling the embedded stack for 60 s.

The stack runs as `batchlab up` runs it (every service in its own process, a local Ray and
one trainer), with an auth token, and holds one finished experiment so that reads hit real
data. 32 clients (each its own channel, as separate programs would have; spread over 4
processes so that the clients' own interpreter lock is not what is measured) call in a loop,
each picking its next call at random with the weights of :data:`MIX`: what people and
dashboards do (get, list, list trials, validate a spec) and what trainers do (report
progress, list checkpoints, ask for a shard). Four WatchExperiment streams stay open
throughout. Reported: calls, errors (any status but OK), calls per second, and p50 / p99
latency overall and per method.

Usage: python -m benchmarks.load [--quick] [--out DIR]   (--quick: 4 clients for 5 s)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MIX", "run", "to_markdown"]

TOKEN = "load-token"
CLIENTS, SECONDS, PROCESSES, WATCHES = 32, 60.0, 4, 4
QUICK = {"clients": 4, "seconds": 5.0, "processes": 2, "watches": 1}
# Relative weights of the calls each client makes.
MIX = {
    "GetExperiment": 30,
    "ListExperiments": 10,
    "ListTrials": 20,
    "SubmitExperiment(validate_only)": 5,
    "ReportProgress": 15,
    "ListCheckpoints": 10,
    "GetShard": 10,
}

SPEC = {
    "name": "load",
    "search_seed": 0,
    "trials_per_study": 2,
    "max_total_trials": 2,
    "seeds_per_best": 1,
    "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{
        "workload": "mnist1d_resnet1d_small",
        "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
        "points": [{"batch_size": 32, "step_budget": 20, "eval_every_steps": 10}],
    }],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov", "learning_rate": 0.1},
        "search_space": {"parameters": [
            {"path": "optimizer.learning_rate", "log": {"min": 0.01, "max": 0.3}}]},
    }],
}


def _client_calls(addresses: dict[str, str], names: dict[str, Any]):
    """The calls of MIX as zero-argument functions over one client's own channels."""
    from google.protobuf import json_format

    from batchlab.proto.v1 import (
        checkpoints_pb2,
        checkpoints_pb2_grpc,
        controller_pb2,
        controller_pb2_grpc,
        experiment_pb2,
        sharding_pb2,
        sharding_pb2_grpc,
    )
    from batchlab.rpc.client import channel

    channels = [channel(addresses[role], token=TOKEN)
                for role in ("controller", "checkpoints", "sharding")]
    controller = controller_pb2_grpc.ExperimentServiceStub(channels[0])
    checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(channels[1])
    sharding = sharding_pb2_grpc.ShardingServiceStub(channels[2])
    experiment, trial = names["experiment"], names["trial"]
    spec = json_format.ParseDict(SPEC, experiment_pb2.ExperimentSpec())
    step = iter(range(10**9))
    calls = {
        "GetExperiment": lambda: controller.GetExperiment(
            controller_pb2.GetExperimentRequest(name=experiment), timeout=30),
        "ListExperiments": lambda: controller.ListExperiments(
            controller_pb2.ListExperimentsRequest(page_size=10), timeout=30),
        "ListTrials": lambda: controller.ListTrials(
            controller_pb2.ListTrialsRequest(parent=experiment), timeout=30),
        "SubmitExperiment(validate_only)": lambda: controller.SubmitExperiment(
            controller_pb2.SubmitExperimentRequest(spec=spec, validate_only=True), timeout=30),
        # A trainer's report for a finished attempt: stored, and answered cancel=true. With the
        # evaluation service a trainer's points await the evaluator's numbers (the controller
        # refuses any other point from a trainer in that mode).
        "ReportProgress": lambda: controller.ReportProgress(controller_pb2.ReportProgressRequest(
            points=[controller_pb2.MetricPoint(trial=trial, attempt=1, step=1000 + next(step),
                                               values={"train/batch_loss": 1.0},
                                               awaiting_evaluation=True)]), timeout=30),
        "ListCheckpoints": lambda: checkpoints.ListCheckpoints(
            checkpoints_pb2.ListCheckpointsRequest(trial=trial), timeout=30),
        "GetShard": lambda: sharding.GetShard(sharding_pb2.GetShardRequest(
            dataset="mnist1d", config="small", split="train", shard_count=2, shard_index=1,
            epoch=next(step) % 5, seed=3, shuffle=True, max_indices=256), timeout=30),
    }
    return calls, channels


def _client_process(addresses, names, clients: int, seconds: float, seed: int, out) -> None:
    """Runs ``clients`` client threads until the deadline; puts their records on ``out``."""
    import grpc

    start_at = names["start_at"]
    records: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        calls, channels = _client_calls(addresses, names)
        rng = random.Random(seed * 1000 + index)
        kinds, weights = list(MIX), list(MIX.values())
        mine = []
        while time.time() < start_at:
            time.sleep(0.01)
        deadline = start_at + seconds
        while time.time() < deadline:
            kind = rng.choices(kinds, weights)[0]
            begin = time.perf_counter()
            try:
                calls[kind]()
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            mine.append((kind, code, time.perf_counter() - begin))
        for chan in channels:
            chan.close()
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(records)


def _watch(address: str, name: str, stop: threading.Event, messages: list[int]) -> None:
    import grpc

    from batchlab.proto.v1 import controller_pb2, controller_pb2_grpc
    from batchlab.rpc.client import channel

    with channel(address, token=TOKEN) as chan:
        stream = controller_pb2_grpc.ExperimentServiceStub(chan).WatchExperiment(
            controller_pb2.WatchExperimentRequest(name=name, period_seconds=1.0))
        stop_watch = threading.Thread(target=lambda: (stop.wait(), stream.cancel()), daemon=True)
        stop_watch.start()
        try:
            for _ in stream:
                messages[0] += 1
        except grpc.RpcError:
            pass


def _seed(stack) -> dict[str, Any]:
    """One finished experiment (trials, points, checkpoints) for the reads to hit."""
    from batchlab.client import ExperimentClient
    from batchlab.search import load_spec

    with ExperimentClient(stack.address("controller"), token=TOKEN) as client:
        experiment = client.submit(load_spec(SPEC, validate_optimizers=False))
        deadline = time.monotonic() + 600
        while experiment.state < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the load benchmark's seed experiment did not finish")
            time.sleep(1)
            experiment = client.get(experiment.name)
        trials = list(client.trials(experiment.name))
    if experiment.state != 3:
        raise RuntimeError(f"the seed experiment ended in state {experiment.state}: "
                           f"{experiment.error}")
    return {"experiment": experiment.name, "trial": trials[0].name}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1e3, 2)}


def summarize(records: list[tuple[str, str, float]], seconds: float) -> dict[str, Any]:
    """Calls, errors by code, calls/s and p50/p99, overall and per method."""
    errors: dict[str, int] = {}
    for _, code, _ in records:
        if code != "OK":
            errors[code] = errors.get(code, 0) + 1
    methods = {}
    for kind in MIX:
        mine = [r for r in records if r[0] == kind]
        methods[kind] = {"calls": len(mine), "errors": sum(1 for r in mine if r[1] != "OK"),
                         **_percentiles([r[2] for r in mine if r[1] == "OK"])}
    return {
        "calls": len(records),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "calls_per_s": round(len(records) / seconds, 1),
        **_percentiles([r[2] for r in records if r[1] == "OK"]),
        "methods": methods,
    }


def run(*, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Start the stack, seed it, run the load; the figures (see :func:`summarize`).

    Args:
      rounds: unused (one load run; kept for benchmarks.run's interface).
      quick: 4 clients for 5 s instead of 32 for 60 s (a smoke run).
    """
    from batchlab import data as bdata
    from batchlab.client import Stack
    from batchlab.rpc.client import free_ports

    del rounds
    shape = QUICK if quick else {"clients": CLIENTS, "seconds": SECONDS,
                                 "processes": PROCESSES, "watches": WATCHES}
    with tempfile.TemporaryDirectory(prefix="batchlab-load-") as tmp:
        state = Path(tmp) / "state"
        bdata.prepare("mnist1d", state / "tfds", config="small")
        roles = ["controller", "sharding", "checkpoints", "evaluator"]
        stack = Stack(state, ports=dict(zip(roles, free_ports(4), strict=True)),
                      metrics_ports=dict(zip([*roles, "trainer"], free_ports(5), strict=True)),
                      token=TOKEN, num_trainers=1, environ={},
                      extra_env={"BATCHLAB_RAY_CPUS": "2"})
        stack.up(timeout=300)
        try:
            names = _seed(stack)
            addresses = {role: stack.address(role) for role in roles}
            stop, seen = threading.Event(), [0]
            watchers = [threading.Thread(target=_watch, args=(
                addresses["controller"], names["experiment"], stop, seen))
                for _ in range(shape["watches"])]
            for watcher in watchers:
                watcher.start()
            context = multiprocessing.get_context("spawn")
            out = context.Queue()
            names["start_at"] = time.time() + 5.0  # every process ready before the clock runs
            per_process = [shape["clients"] // shape["processes"]] * shape["processes"]
            for i in range(shape["clients"] % shape["processes"]):
                per_process[i] += 1
            processes = [context.Process(target=_client_process, args=(
                addresses, names, n, shape["seconds"], i, out)) for i, n in enumerate(per_process)]
            for process in processes:
                process.start()
            records = [record for _ in processes for record in out.get()]
            for process in processes:
                process.join()
            stop.set()
            for watcher in watchers:
                watcher.join(timeout=10)
        finally:
            stack.down()
    result = summarize(records, shape["seconds"])
    result.update(clients=shape["clients"], seconds=shape["seconds"], watches=shape["watches"],
                  watch_messages=seen[0])
    return result


def to_markdown(r: dict[str, Any]) -> str:
    """Render the result as a markdown section."""
    rows = [f"| {kind} | {m['calls']:,} | {m['errors']:,} | {m['p50_ms']:.1f} | "
            f"{m['p99_ms']:.1f} |" for kind, m in r["methods"].items()]
    errors = ", ".join(f"{k} {v:,}" for k, v in r["errors_by_code"].items()) or "none"
    return "\n".join([
        f"## The services under load: {r['clients']} clients for {r['seconds']:.0f} s",
        "",
        f"The embedded stack (separate processes, auth token, one trainer) with one finished "
        f"experiment; {r['clients']} clients call in a loop with a fixed mix, "
        f"{r['watches']} WatchExperiment streams open throughout. Latency of answered calls.",
        "",
        "| calls | errors | calls/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
        f"| {r['calls']:,} | {r['errors']:,} ({errors}) | {r['calls_per_s']:.1f} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |",
        "",
        "| method | calls | errors | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 clients for 5 s (a smoke run)")
    parser.add_argument("--out", default=None, help="also write load.json and load.md here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(quick=args.quick)
    text = to_markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.json").write_text(json.dumps(result, indent=1))
        (out / "load.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
