"""`batchlab local run` with runs in worker processes, several at once.

Fast tests drive the real worker pool with fake train functions (runner_helpers); the slow ones
train mnist1d_resnet1d_small for real and check that a run's stored results do not depend on
what ran beside it, on P, or on an interruption (resume is exact).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
import runner_helpers as helpers

from batchlab.cli import build_parser
from batchlab.runner import ResultStore, run_experiment
from batchlab.runner.resources import (
    SMALL_MODEL_PARAMETERS,
    WORKER_BASE_BYTES,
    available_cpus,
    model_parameters,
    plan_execution,
)

HERE = Path(__file__).resolve().parent


def _run(spec, out, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("write_report", False)
    return run_experiment(spec, out, **kwargs)


# ----------------------------------------------------------------------------- sizing rule


def test_small_models_get_one_thread_and_as_many_runs_as_cpus():
    plan = plan_execution(["mnist1d_resnet1d"], cpus=4, memory_bytes=64 << 30, accelerator="")
    assert plan.threads_per_run == {"mnist1d_resnet1d": 1}
    assert plan.parallel == 4


def test_large_models_get_every_cpu_and_run_one_at_a_time():
    plan = plan_execution(["imagenet_resnet50"], cpus=4, memory_bytes=64 << 30, accelerator="")
    assert plan.threads_per_run == {"imagenet_resnet50": 4}
    assert plan.parallel == 1


def test_mixed_workloads_keep_their_own_thread_counts():
    plan = plan_execution(["mnist1d_resnet1d", "big"], cpus=8, memory_bytes=64 << 30, accelerator="",
                          parameters={"mnist1d_resnet1d": 5658, "big": SMALL_MODEL_PARAMETERS})
    assert plan.threads_per_run == {"big": 8, "mnist1d_resnet1d": 1}
    assert plan.parallel == 1  # room for one whole-machine run


def test_memory_caps_the_runs_at_once():
    plan = plan_execution(["mnist1d_resnet1d"], cpus=16, memory_bytes=3 * WORKER_BASE_BYTES,
                          accelerator="")
    assert plan.parallel == 2  # 80% of 3 GiB holds two 1 GiB workers
    assert "memory allows 2" in plan.reason


def test_an_accelerator_runs_one_at_a_time():
    plan = plan_execution(["mnist1d_resnet1d"], cpus=8, memory_bytes=64 << 30, accelerator="gpu")
    assert plan.parallel == 1


def test_overrides_and_their_errors():
    plan = plan_execution(["mnist1d_resnet1d"], parallel=3, threads_per_run=2, cpus=2)
    assert (plan.parallel, plan.threads_per_run) == (3, {"mnist1d_resnet1d": 2})
    with pytest.raises(ValueError, match=r"^parallel: must be an integer >= 1, got 0"):
        plan_execution(["mnist1d_resnet1d"], parallel=0, cpus=2)
    with pytest.raises(ValueError, match=r"^threads_per_run: at most the 2 CPUs"):
        plan_execution(["mnist1d_resnet1d"], threads_per_run=3, cpus=2)


def test_a_folder_keeps_the_thread_count_its_runs_used():
    plan = plan_execution(["mnist1d_resnet1d"], stored_threads={"mnist1d_resnet1d": 2}, cpus=2,
                          memory_bytes=64 << 30, accelerator="")
    assert plan.threads_per_run == {"mnist1d_resnet1d": 2}  # not the rule's 1
    assert plan.parallel == 1
    with pytest.raises(ValueError, match=r"^threads_per_run: this folder's mnist1d_resnet1d runs used 2"):
        plan_execution(["mnist1d_resnet1d"], threads_per_run=1, cpus=2,
                       stored_threads={"mnist1d_resnet1d": 2})


def test_parameter_counts_without_starting_jax():
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()  # an earlier test in this process may have
    assert model_parameters("imagenet_resnet50") == 25_557_032  # ResNet-50 v1.5
    assert model_parameters("mnist1d_resnet1d") < SMALL_MODEL_PARAMETERS
    assert model_parameters("bert_large_phase1") > 300_000_000  # BERT-Large: about 335 M
    assert xla_bridge.backends_are_initialized() == started


def test_cli_takes_parallel_and_threads_per_run(capsys):
    args = build_parser().parse_args(["local", "run", "s.yaml", "--out", "o", "--parallel", "3",
                                      "--threads-per-run", "1"])
    assert (args.parallel, args.threads_per_run) == (3, 1)
    assert build_parser().parse_args(["local", "run", "s.yaml", "--out", "o"]).parallel is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["local", "run", "s.yaml", "--out", "o", "--parallel", "0"])
    assert "--parallel: expected an integer >= 1, got '0'" in capsys.readouterr().err


# ------------------------------------------------------------------ worker pool, fake runs


def _barrier_runs(tmp_path, monkeypatch, spec):
    """``spec`` run at P=2 with barrier_train: (every stored run, the first two to start)."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv(helpers.BARRIER_ENV, str(barrier))
    _run(spec, tmp_path / "out", train_fn=helpers.barrier_train, parallel=2)
    runs = helpers.stored_results(tmp_path / "out")
    assert all(r["result"]["outcome"] == "SUCCEEDED" for r in runs.values())
    return runs, [r for r in runs.values() if r["result"]["barrier"]["first_two"]]


def test_runs_of_two_studies_train_at_once_in_separate_workers(tmp_path, monkeypatch):
    spec = helpers.fake_spec("two-studies", optimizers=2, trials=1, reruns=1)
    runs, first = _barrier_runs(tmp_path, monkeypatch, spec)
    assert len(runs) == 4
    # Each study has one tuning trial: while it trains, only the other study can use the slot.
    assert {r["request"]["study_id"] for r in first} == {
        s["id"] for s in ResultStore(tmp_path / "out").read_experiment()["studies"]}
    assert all(r["result"]["barrier"]["met"] for r in first)  # each saw the other arrive
    assert len({r["result"]["worker"]["pid"] for r in first}) == 2
    for r in runs.values():  # one XLA thread each, and the OS may still use every CPU
        assert r["result"]["worker"]["cpus"] == available_cpus()
        assert r["result"]["worker"]["narrowed_threads"] == 0
    assert ResultStore(tmp_path / "out").read_experiment()["execution"]["parallel"] == 2


def test_the_first_runs_in_flight_belong_to_different_studies(tmp_path, monkeypatch):
    # Each study could fill both slots with its own tuning trials; the first two go to two
    # studies, so two workers do not compile one study's programs at the same time.
    spec = helpers.fake_spec("spread", optimizers=2, trials=3, reruns=1)
    runs, first = _barrier_runs(tmp_path, monkeypatch, spec)
    assert len(runs) == 8
    assert len(first) == 2 and all(r["result"]["barrier"]["met"] for r in first)
    assert len({r["request"]["study_id"] for r in first}) == 2


def test_reruns_start_only_after_every_tuning_run_is_stored(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(helpers.OUT_ENV, str(out))
    spec = helpers.fake_spec("reruns-wait", optimizers=1, trials=3, reruns=2)
    _run(spec, out, train_fn=helpers.stored_runs_train, parallel=3)
    runs = helpers.stored_results(out)
    tuning = {f"t{i}_r0_a1.json" for i in range(3)}
    reruns = [r for r in runs.values() if r["request"]["kind"] == "rerun"]
    assert len(reruns) == 2
    for r in reruns:
        assert tuning <= set(r["result"]["stored_at_start"])


def test_a_worker_dying_mid_run_is_a_failed_attempt_and_the_run_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv(helpers.CRASH_ENV, str(tmp_path / "crashed"))
    spec = helpers.fake_spec("crash", optimizers=1, trials=2, reruns=1)
    _run(spec, tmp_path / "out", train_fn=helpers.crash_once_train, parallel=1)
    runs = {name.split("/")[1]: r["result"] for name, r in helpers.stored_results(tmp_path / "out").items()}
    assert runs["t0_r0_a1.json"]["outcome"] == "FAILED"
    assert runs["t0_r0_a1.json"]["error"] == "worker process exited with code 9 during the run"
    assert runs["t0_r0_a2.json"]["outcome"] == "SUCCEEDED"
    assert ResultStore(tmp_path / "out").read_experiment()["status"] == "SUCCEEDED"


def test_an_invalid_run_configuration_raises_naming_the_run(tmp_path):
    spec = helpers.fake_spec("invalid", optimizers=1, trials=1, reruns=1)
    with pytest.raises(ValueError, match=r"^mnist1d_resnet1d_small\.opt0\.b32\.s20/t0/r0/a1: ValueError: optimizer\.learning_rate"):
        _run(spec, tmp_path / "out", train_fn=helpers.invalid_config_train, parallel=1)
    assert not (tmp_path / "out" / "runs").exists()


def test_train_fn_must_be_importable_by_workers(tmp_path):
    spec = helpers.fake_spec("lambda", optimizers=1, trials=1, reruns=1)
    with pytest.raises(ValueError, match=r"^train_fn: .* module-level function"):
        _run(spec, tmp_path / "out", train_fn=lambda request, study, data_dir: {})


def test_resuming_with_another_thread_count_is_refused(tmp_path, monkeypatch):
    if available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    monkeypatch.setenv(helpers.OUT_ENV, str(tmp_path / "out"))
    spec = helpers.fake_spec("threads", optimizers=1, trials=1, reruns=1)
    _run(spec, tmp_path / "out", train_fn=helpers.stored_runs_train, threads_per_run=1)
    with pytest.raises(ValueError, match=r"^threads_per_run: this folder's mnist1d_resnet1d_small runs used 1"):
        _run(spec, tmp_path / "out", train_fn=helpers.stored_runs_train, threads_per_run=2)


# ------------------------------------------------------------------------ real training


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A compilation cache private to this module; workers use the root this process sets."""
    path = tmp_path_factory.mktemp("jax_cache")
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(path))
    yield path
    jax.config.update("jax_compilation_cache_dir", saved)


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory, small_data_dir, jax_cache):
    """PAIR run with --parallel 1: the reference every other execution must reproduce."""
    out = tmp_path_factory.mktemp("one_at_a_time")
    _run(helpers.PAIR, out, data_dir=small_data_dir, parallel=1)
    return out


def _assert_same_runs(out, reference):
    ours, theirs = helpers.stored_results(out), helpers.stored_results(reference)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        a = json.dumps(helpers.comparable(ours[name]["result"]), sort_keys=True)
        b = json.dumps(helpers.comparable(theirs[name]["result"]), sort_keys=True)
        assert a == b, name
    for path in sorted((Path(reference) / "studies").glob("*.json")):
        mine = json.loads((Path(out) / "studies" / path.name).read_text())
        assert mine["score"] == json.loads(path.read_text())["score"]


@pytest.mark.slow
def test_reference_has_a_mid_run_divergence_and_healthy_runs(one_at_a_time):
    results = [r["result"] for r in helpers.stored_results(one_at_a_time).values()]
    diverged = [r for r in results if r["outcome"] == "DIVERGED"]
    assert len(diverged) == 1 and len(results) == 3
    for r in diverged:  # after the first evaluation, before the budget
        assert 10 < r["diverged_step"] < 30 and [p["step"] for p in r["curve"]] == [10.0]
    assert all(len(r["curve"]) == 3 for r in results if r["outcome"] == "SUCCEEDED")


@pytest.mark.slow
def test_runs_at_once_equal_runs_one_at_a_time(tmp_path, small_data_dir, one_at_a_time):
    # Two at once: the diverging run trains beside the healthy study's tuning run.
    _run(helpers.PAIR, tmp_path / "p2", data_dir=small_data_dir, parallel=2)
    _assert_same_runs(tmp_path / "p2", one_at_a_time)


_PINNED = """
import json, os, sys
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # before JAX starts: 1 thread
from batchlab.runner.local import _train
from batchlab.runner.workers import request_from_payload
from batchlab.search import expand_studies, load_spec
spec, request, data_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
request = request_from_payload(request)
study = {s.id: s for s in expand_studies(load_spec(spec))}[request.study_id]
print(json.dumps(_train(request, study, data_dir)))
"""


@pytest.mark.slow
def test_a_one_thread_worker_computes_what_a_process_pinned_to_one_cpu_does(
        one_at_a_time, small_data_dir):
    # The worker's mechanism (one CPU while JAX starts, every CPU after) must give the numbers
    # of a process that only ever had one CPU, cache or no cache.
    runs = helpers.stored_results(one_at_a_time)
    picked = [next(r for r in runs.values() if r["result"]["outcome"] == o) for o in ("SUCCEEDED", "DIVERGED")]
    for run in picked:
        env = {**os.environ, "BATCHLAB_JAX_CACHE": "0", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [sys.executable, "-c", _PINNED, json.dumps(helpers.PAIR), json.dumps(run["request"]),
             small_data_dir], check=True, capture_output=True, text=True, env=env, timeout=600)
        alone = json.loads(out.stdout.strip().splitlines()[-1])
        assert json.dumps(helpers.comparable(alone), sort_keys=True) == json.dumps(
            helpers.comparable(run["result"]), sort_keys=True)


_INTERRUPTED = """
import signal, sys
# Ctrl-C as a terminal delivers it, whatever disposition the test runner's process passed on
# (a process that ignores SIGINT hands SIG_IGN down to its children).
signal.signal(signal.SIGINT, signal.default_int_handler)
from runner_helpers import PAIR, gated_train
from batchlab.runner import run_experiment
if __name__ == "__main__":
    run_experiment(PAIR, sys.argv[1], data_dir=sys.argv[2], progress=False, write_report=False,
                   parallel=2, train_fn=gated_train)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "crash"])
def test_an_interrupted_experiment_resumes_exactly(sig, tmp_path, small_data_dir, jax_cache,
                                                   one_at_a_time):
    out = tmp_path / "out"
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    env = {**os.environ, helpers.GATE_ENV: str(tmp_path / "never"), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # Output to a file, not a pipe nobody reads while the runner runs: on a fresh clone (cold
    # caches, more log lines) the pipe filled and the runner blocked writing after Ctrl-C.
    log_path = tmp_path / "runner.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(script), str(out), small_data_dir], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # Both tuning runs finish; the healthy study's rerun then waits at the gate, in flight.
        _wait_until(lambda: len(list(out.glob("runs/*/*.json"))) >= 2 or proc.poll() is not None,
                    600, "the ungated runs")
        assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
        workers = _children(proc.pid)
        assert workers
        proc.send_signal(sig)
        proc.wait(timeout=120)
        _wait_until(lambda: not any(_running(pid) for pid in workers), 60, "the workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    before = helpers.stored_results(out)
    assert sorted(name.split("/")[1] for name in before) == ["t0_r0_a1.json", "t0_r0_a1.json"]
    assert ResultStore(out).read_experiment()["status"] == "RUNNING"

    _run(helpers.PAIR, out, data_dir=small_data_dir, parallel=2, train_fn=helpers.gated_train)
    after = helpers.stored_results(out)
    for name, run in before.items():  # finished runs were read back, not trained again
        assert after[name] == run
    _assert_same_runs(out, one_at_a_time)
    assert ResultStore(out).read_experiment()["status"] == "SUCCEEDED"
