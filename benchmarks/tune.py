"""batchlab against the peer users would pick: the same study through Ray Tune's Tuner.

One small study (``spec``: benchmarks/system.py's workload, search space, budget and evaluation
points, with 2P tuning trials and P seed reruns of the best, P the runs at once: 4 and 2 here)
runs three ways on the same machine, in interleaved rounds, each round in a fresh folder:

- local: `batchlab local run` (run_experiment in a fresh ``python``, as benchmarks/system.py
  runs it: ``system._local``), P runs at once, each with T XLA:CPU threads
  (batchlab.runner.resources sizes both).
- services: the embedded stack (``system.embedded_stack``: controller, sharding, checkpoints,
  evaluation service, Ray trainers) with P trainer actors of one CPU each.
- tune: ``ray.tune.Tuner`` in a fresh ``python``, over the exact runs the local run of the
  first round stored (every tuning trial and seed rerun, with its hyperparameters and seed).
  Each Tune trial calls the function `batchlab local run`'s workers call per run
  (``batchlab.runner.local._train``: RunRequest -> RunResult) after starting JAX with the same
  T threads (``start_jax_with_threads``) and a compilation cache kept apart by T, as those
  workers do. Trial resources ``{"cpu": T}``, ``max_concurrent_trials=P``, a Ray of the same
  CPUs as the stack's; everything else is Tune's default (e.g. ``reuse_actors=False``).

The local run and the services follow the study protocol: seed reruns start only once every
tuning trial has ended (they rerun the best). Tune gets the finished list and may start a
rerun while tuning trials still run. With whole waves of P trials and reruns, both fill their
slots in the same waves.

Two figures per path, as in benchmarks/system.py:

- cold: from nothing, empty JAX compilation caches. local: starting ``python`` to the end of
  run_experiment; services: `batchlab up` to SUCCEEDED; tune: starting ``python`` (importing
  Ray Tune, starting Ray) to the end of ``Tuner.fit``.
- warm: a second identical study in the same process / on the same stack / in the same Ray
  session, with the compilation cache the first one filled.

Fairness: the same trial (hyperparameters, seed) trained with the same XLA thread count gives
bit-identical numbers, so Tune's curves, outcomes and final metrics must equal local run's, and
the services' final metrics too (all the controller's API returns per trial).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SPEC", "run", "spec", "to_markdown", "tune_session", "tune_trial"]

log = logging.getLogger(__name__)

TARGET = 1.0
"""services / tune wall time, at most (the issue's 'no slower than Tune on the same work')."""

_REPO = Path(__file__).resolve().parents[1]
_COMPARED = ("outcome", "curve", "final_metrics", "steps_to_target", "diverged_step")
PATHS = ("local", "services", "tune")


def spec(*, quick: bool = False, parallel: int = 2) -> dict[str, Any]:
    """The study: system.SPEC with 2P tuning trials and P seed reruns of the best, P the runs
    at once (quick: 2 trials of 60 steps, no rerun).

    Whole waves of P: the protocol's wait for the end of tuning before the reruns then costs
    nothing that Tune, given the finished list, would not pay too.
    """
    from benchmarks import system

    trials, reruns = (2, 0) if quick else (2 * parallel, parallel)
    out = {**system.SPEC, "name": "tune-comparison", "trials_per_study": trials,
           "max_total_trials": trials, "seeds_per_best": reruns}
    if quick:
        out["workloads"] = [{**w, "points": [{"batch_size": 64, "step_budget": 60, "eval_every_steps": 30}]}
                            for w in system.SPEC["workloads"]]
    return out


SPEC = spec()
"""The study on a machine that runs 2 at once (this 2-core one): 4 trials, 2 reruns."""


def _key(request: Mapping[str, Any]) -> str:
    return f"t{request['trial_index']}_r{request['replica']}"


def _stored_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """key -> {"request", "result"} of a results folder's runs (the last attempt of each)."""
    runs: dict[str, dict[str, Any]] = {}
    for path in sorted((folder / "runs").glob("*/t*_r*_a*.json"),
                       key=lambda p: int(p.stem.rsplit("_a", 1)[1])):
        stored = json.loads(path.read_text())
        runs[_key(stored["request"])] = stored

    def order(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
        request = item[1]["request"]
        return request["replica"], request["trial_index"]

    return dict(sorted(runs.items(), key=order))


def _run_figures(results: list[Mapping[str, Any]]) -> dict[str, float]:
    """Sums of the RunResults' own timings (seconds)."""
    sums = {f"{k}_sum_s": float(sum(r.get(k) or 0.0 for r in results))
            for k in ("wall_time_s", "startup_time_s", "train_time_s")}
    # What train_and_evaluate spent besides the first step and the steps: set-up before the
    # first step (model initialisation, opening the data) and the evaluations.
    sums["rest_sum_s"] = sums["wall_time_s_sum_s"] - sums["startup_time_s_sum_s"] - sums["train_time_s_sum_s"]
    return sums


# -- the Tune side ----------------------------------------------------------------------------

def tune_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: one batchlab run, as a `batchlab local run` worker trains it.

    Args:
      config: {"request": a RunRequest payload, "spec": the experiment spec mapping,
        "threads": T, "cache_root": the compilation cache root, "data_dir": the tfds folder}.
    """
    entered = time.time()
    from ray import tune

    from batchlab.runner.local import _train
    from batchlab.runner.resources import start_jax_with_threads
    from batchlab.runner.workers import request_from_payload
    from batchlab.search import expand_studies, load_spec
    from batchlab.train.compilation_cache import enable_compilation_cache

    threads = int(config["threads"])
    # What a local-run worker does before its first run: results depend on T (resources.py).
    start_jax_with_threads(threads)
    enable_compilation_cache(config["cache_root"], cpu_threads=threads)
    request = request_from_payload(config["request"])
    studies = expand_studies(load_spec(config["spec"], validate_optimizers=False))
    study = next(s for s in studies if s.id == request.study_id)
    ready = time.time()
    result = _train(request, study, config["data_dir"])
    tune.report({"result_json": json.dumps(result), "pid": os.getpid(), "entered_at": entered,
                 "ready_at": ready, "ended_at": time.time()})


def _fit(runs: list[dict[str, Any]], args: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One Tuner.fit over ``runs``: its start and end (epoch seconds) and each trial's
    measurements and RunResult, in ``runs`` order."""
    from ray import tune

    trainable = tune.with_resources(tune_trial, {"cpu": args["threads"]})
    tuner = tune.Tuner(
        trainable,
        param_space={"request": tune.grid_search([r["request"] for r in runs]), "spec": args["spec"],
                     "threads": args["threads"], "cache_root": args["cache_root"],
                     "data_dir": args["data_dir"]},
        tune_config=tune.TuneConfig(max_concurrent_trials=args["parallel"]),
        run_config=tune.RunConfig(name=name, storage_path=args["storage"], verbose=0),
    )
    fit_start = time.time()
    grid = tuner.fit()
    fit_end = time.time()
    trials = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"a Tune trial failed: {result.error}")
        m = result.metrics
        trials.append({"key": _key(result.config["request"]), "result": json.loads(m["result_json"]),
                       **{k: m[k] for k in ("pid", "entered_at", "ready_at", "ended_at")}})
    order = [_key(r["request"]) for r in runs]
    return {"fit_start": fit_start, "fit_end": fit_end,
            "trials": sorted(trials, key=lambda t: order.index(t["key"]))}


def tune_session(args_path: str) -> None:
    """The Tune side's fresh process: import Tune, start Ray, fit the study twice (cold, warm).

    Args:
      args_path: a JSON file {"runs", "spec", "threads", "parallel", "cpus", "cache_root",
        "data_dir", "storage", "ray_dir", "out"}; the measurements go to ``out`` as JSON.
    """
    t0 = time.perf_counter()
    args = json.loads(Path(args_path).read_text())
    from ray import tune  # noqa: F401 - timed: what a Tune user's script imports

    from batchlab.runner.local_ray import ensure_local_ray

    t1 = time.perf_counter()
    ensure_local_ray(args["ray_dir"], num_cpus=args["cpus"])
    t2 = time.perf_counter()
    cold = _fit(args["runs"], args, "cold")
    cold_end = time.time()
    t3 = time.perf_counter()
    warm = _fit(args["runs"], args, "warm")
    t4 = time.perf_counter()
    Path(args["out"]).write_text(json.dumps({
        "import_s": t1 - t0, "ray_start_s": t2 - t1, "cold_fit_s": t3 - t2, "warm_s": t4 - t3,
        "cold_end": cold_end, "cold": cold, "warm": warm}, allow_nan=True))


def _tune(root: Path, the_spec: dict[str, Any], runs: list[dict[str, Any]],
          execution: Mapping[str, Any]) -> dict[str, Any]:
    from batchlab import data as bdata
    from batchlab.runner.local_ray import LOCAL_RAY_ENV

    data_dir = root / "tune" / "tfds"
    bdata.prepare("mnist1d", data_dir, config="small")
    # Ray puts unix sockets in its session folder: a short path outside TMPDIR.
    ray_dir = tempfile.mkdtemp(prefix="bltune-", dir="/tmp")
    workload = the_spec["workloads"][0]["workload"]
    args = {"runs": runs, "spec": the_spec, "threads": execution["threads_per_run"][workload],
            "parallel": execution["parallel"], "cpus": execution["cpus"],
            "cache_root": str(root / "tune" / "jax_cache"), "data_dir": str(data_dir),
            "storage": str(root / "tune" / "ray_results"), "ray_dir": ray_dir,
            "out": str(root / "tune" / "measured.json")}
    args_path = root / "tune" / "args.json"
    args_path.write_text(json.dumps(args))
    # Ray's workers inherit this environment: loopback only, and benchmarks.tune importable.
    env = {**os.environ, **LOCAL_RAY_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO), os.environ.get("PYTHONPATH")) if p)}
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys; from benchmarks.tune import tune_session; "
                               "tune_session(sys.argv[1])", str(args_path)],
                              cwd=_REPO, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the Tune session failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    measured = json.loads(Path(args["out"]).read_text())
    measured["cold_s"] = measured.pop("cold_end") - started
    return measured


# -- the batchlab sides -----------------------------------------------------------------------

def _local(root: Path, the_spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import system

    cold, warm = system._local(root, the_spec)
    folders = {"cold": root / "local_out" / "cold", "warm": root / "local_out" / "warm"}
    experiment = json.loads((folders["cold"] / "experiment.json").read_text())
    return {"cold_s": cold, "warm_s": warm, "execution": experiment["execution"],
            **{phase: _stored_runs(folder) for phase, folder in folders.items()}}


def _service_trials(client: Any, name: str) -> dict[str, dict[str, Any]]:
    """key -> what the controller's API returns of each trial of experiment ``name``."""
    experiment = next(e for e in client.list() if e.spec.name == name)
    out = {}
    for t in client.trials(experiment.name):
        out[f"t{t.trial_index}_r{t.replica}"] = {
            "seed": t.seed,
            "outcome": type(t).DESCRIPTOR.fields_by_name["outcome"].enum_type.values_by_number[t.outcome].name,
            "final_metrics": dict(t.final_metrics),
            "steps_to_target": None if np.isinf(t.steps_to_target) else int(t.steps_to_target),
            "span_s": t.end_time.ToDatetime().timestamp() - t.start_time.ToDatetime().timestamp(),
        }
    return out


def _services(root: Path, the_spec: dict[str, Any], execution: Mapping[str, Any]) -> dict[str, Any]:
    from benchmarks import system

    warm_spec = {**the_spec, "name": the_spec["name"] + "-warm"}
    with system.embedded_stack(root, the_spec, num_trainers=execution["parallel"], ray_cpus=execution["cpus"]) as (
            client, startup):
        cold = startup + system._experiment(client, the_spec)
        warm = system._experiment(client, warm_spec)
        return {"cold_s": cold, "warm_s": warm, "startup_s": startup,
                "cold": _service_trials(client, the_spec["name"]),
                "warm": _service_trials(client, warm_spec["name"])}


# -- the comparison ---------------------------------------------------------------------------

def _comparable(result: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: result.get(k) for k in _COMPARED}, allow_nan=True))


def _fairness(reference: dict[str, dict[str, Any]], measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Every other execution of every trial against the first round's local cold run."""
    mismatches, compared = [], 0
    ref = {k: _comparable(v["result"]) for k, v in reference.items()}
    for m in measured:
        for phase in ("cold", "warm"):
            for key, stored in m["local"][phase].items():
                compared += 1
                if _comparable(stored["result"]) != ref[key]:
                    mismatches.append(f"round {m['round']} local {phase} {key}")
            for trial in m["tune"][phase]["trials"]:
                compared += 1
                if _comparable(trial["result"]) != ref[trial["key"]]:
                    mismatches.append(f"round {m['round']} tune {phase} {trial['key']}")
            for key, trial in m["services"][phase].items():
                compared += 1
                expected = ref[key]
                same = (trial["final_metrics"] == expected["final_metrics"]
                        and trial["outcome"] == expected["outcome"]
                        and trial["steps_to_target"] == expected["steps_to_target"])
                if not same:
                    mismatches.append(f"round {m['round']} services {phase} {key}")
    metric = next(iter(reference.values()))["result"]["final_metrics"]
    target = "validation/accuracy" if "validation/accuracy" in metric else sorted(metric)[0]
    first = measured[0]
    per_trial = []
    for key, stored in reference.items():
        tune = next(t for t in first["tune"]["cold"]["trials"] if t["key"] == key)
        per_trial.append({
            "key": key, "seed": stored["request"]["seed"],
            "hyperparameters": stored["request"]["hyperparameters"],
            "local": stored["result"]["final_metrics"].get(target),
            "tune": tune["result"]["final_metrics"].get(target),
            "services": first["services"]["cold"].get(key, {}).get("final_metrics", {}).get(target),
        })
    return {"identical": not mismatches, "compared": compared, "mismatches": mismatches,
            "metric": target, "first_round": per_trial}


def _tune_waits(fit: Mapping[str, Any], parallel: int) -> dict[str, float]:
    """Tune's own time around the trainables of one fit, in seconds.

    start_wait: for each trial, from its slot being free (the fit's start for the first P,
    else the end of the trial that freed the slot) to its trainable beginning (scheduling,
    the actor's process); set_up: from there to calling the train function (importing
    batchlab and JAX, starting JAX, reading the spec); wind_down: from the last trial's
    report to Tuner.fit returning.
    """
    trials = sorted(fit["trials"], key=lambda t: t["entered_at"])
    waits, ends = [], []
    for k, t in enumerate(trials):
        free_at = fit["fit_start"] if k < parallel else sorted(ends)[k - parallel]
        waits.append(t["entered_at"] - free_at)
        ends.append(t["ended_at"])
    return {"start_wait_sum_s": float(sum(waits)),
            "set_up_sum_s": float(sum(t["ready_at"] - t["entered_at"] for t in trials)),
            "trial_span_sum_s": float(sum(t["ended_at"] - t["entered_at"] for t in trials)),
            "wind_down_s": fit["fit_end"] - max(ends),
            "processes": len({t["pid"] for t in trials})}


def _breakdown(m: Mapping[str, Any], parallel: int) -> dict[str, dict[str, Any]]:
    """Where each path's time went in one round, from what was measured."""
    out: dict[str, dict[str, Any]] = {}
    for phase in ("cold", "warm"):
        local_results = [v["result"] for v in m["local"][phase].values()]
        tune_results = [t["result"] for t in m["tune"][phase]["trials"]]
        local = {"wall_s": m["local"][f"{phase}_s"], "runs": len(local_results), **_run_figures(local_results)}
        tune = {"wall_s": m["tune"][f"{phase}_s"], "runs": len(tune_results), **_run_figures(tune_results),
                **_tune_waits(m["tune"][phase], parallel)}
        services_trials = list(m["services"][phase].values())
        services = {"wall_s": m["services"][f"{phase}_s"], "runs": len(services_trials),
                    "trial_span_sum_s": float(sum(t["span_s"] for t in services_trials))}
        for row in (local, tune):
            row["outside_runs_s"] = parallel * row["wall_s"] - row["wall_time_s_sum_s"]
        if phase == "cold":
            tune.update(import_s=m["tune"]["import_s"], ray_start_s=m["tune"]["ray_start_s"])
            services["stack_start_s"] = m["services"]["startup_s"]
        out[phase] = {"local": local, "services": services, "tune": tune}
    return out


def run(*, rounds: int = 2, quick: bool = False) -> dict[str, Any]:
    """Run the three paths ``rounds`` times (the order rotating each round); report medians,
    runs per hour, the ratios against Tune, the fairness check and where the time went."""
    from batchlab.runner.resources import plan_execution

    parallel = plan_execution([SPEC["workloads"][0]["workload"]]).parallel
    the_spec = spec(quick=quick, parallel=parallel)
    measured: list[dict[str, Any]] = []
    reference = execution = None
    for r in range(rounds):
        # Local first in round 0: its stored runs are Tune's trial list.
        order = PATHS[r % 3:] + PATHS[:r % 3]
        with tempfile.TemporaryDirectory(prefix=f"batchlab-tune-{r}-") as tmp:
            root = Path(tmp)
            m: dict[str, Any] = {"round": r, "order": list(order)}
            for path in order:
                t0 = time.perf_counter()
                if path == "local":
                    m["local"] = _local(root, the_spec)
                    if reference is None:
                        reference, execution = m["local"]["cold"], m["local"]["execution"]
                        if execution["parallel"] != parallel:
                            log.warning("local run chose P=%d, the study was sized for P=%d: its waves "
                                        "are not whole", execution["parallel"], parallel)
                elif path == "services":
                    m["services"] = _services(root, the_spec, execution)
                else:
                    m["tune"] = _tune(root, the_spec, list(reference.values()), execution)
                log.info("round %d %s: %.1f s", r, path, time.perf_counter() - t0)
            m["load_1min"] = round(os.getloadavg()[0], 2)
            m["breakdown"] = _breakdown(m, execution["parallel"])
            measured.append(m)
    parallel = execution["parallel"]
    figures: dict[str, Any] = {}
    for path in PATHS:
        for phase in ("cold", "warm"):
            walls = [m[path][f"{phase}_s"] for m in measured]
            runs = measured[0]["breakdown"][phase][path]["runs"]
            figures[f"{path}_{phase}"] = {"wall_s": [round(w, 2) for w in walls], "median_s": float(np.median(walls)),
                                          "runs": runs, "runs_per_hour": runs * 3600.0 / float(np.median(walls))}
    ratios = {f"{path}_over_tune_{phase}": figures[f"{path}_{phase}"]["median_s"] / figures[f"tune_{phase}"]["median_s"]
              for path in ("services", "local") for phase in ("cold", "warm")}
    return {
        "setup": {"workload": the_spec["workloads"][0]["workload"], "point": the_spec["workloads"][0]["points"][0],
                  "trials": the_spec["trials_per_study"], "reruns": the_spec["seeds_per_best"],
                  "parallel": parallel, "threads_per_run": execution["threads_per_run"],
                  "cpus": execution["cpus"], "plan": execution["reason"], "rounds": rounds,
                  "quick": quick},
        "figures": figures,
        "ratios": ratios,
        "fairness": _fairness(reference, measured),
        "breakdown": [m["breakdown"] for m in measured],
        "load_1min": [m["load_1min"] for m in measured],
        "order": [m["order"] for m in measured],
    }


# -- the report -------------------------------------------------------------------------------

def _median(rows: list[Mapping[str, Any]], key: str) -> float:
    return float(np.median([row[key] for row in rows]))


def to_markdown(r: dict[str, Any]) -> str:
    """Render the result as a markdown section."""
    s, f, q = r["setup"], r["figures"], r["ratios"]
    label = {"local": "`batchlab local run`", "services": "batchlab services (embedded stack)",
             "tune": "Ray Tune `Tuner` (same train function)"}
    rows = []
    for phase in ("cold", "warm"):
        for path in PATHS:
            fig = f[f"{path}_{phase}"]
            rows.append(f"| {phase}: {label[path]} | {fig['runs']} | {fig['median_s']:.1f} | "
                        f"{fig['runs_per_hour']:,.0f} | {fig['wall_s']} |")

    def met(ratio: float) -> str:
        return "yes" if ratio <= TARGET else "NO"

    fair = r["fairness"]
    trial_rows = [f"| {t['key']} | {t['seed']} | {t['local']!r} | {t['tune']!r} | {t['services']!r} |"
                  for t in fair["first_round"]]
    per_round = r["breakdown"]
    p = s["parallel"]
    where, notes = [], []
    for phase in ("cold", "warm"):
        med = {path: {k: _median([b[phase][path] for b in per_round], k) for k in per_round[0][phase][path]}
               for path in PATHS}
        loc, tun, srv = med["local"], med["tune"], med["services"]
        where += [
            f"| {phase} | local | {loc['wall_s']:.1f} | {p * loc['wall_s']:.1f} | {loc['wall_time_s_sum_s']:.1f} "
            f"| {loc['startup_time_s_sum_s']:.1f} | {loc['train_time_s_sum_s']:.1f} | {loc['rest_sum_s']:.1f} "
            f"| {loc['outside_runs_s']:.1f} | |",
            f"| {phase} | tune | {tun['wall_s']:.1f} | {p * tun['wall_s']:.1f} | {tun['wall_time_s_sum_s']:.1f} "
            f"| {tun['startup_time_s_sum_s']:.1f} | {tun['train_time_s_sum_s']:.1f} | {tun['rest_sum_s']:.1f} "
            f"| {tun['outside_runs_s']:.1f} | "
            + (f"import ray.tune {tun['import_s']:.1f}, Ray start {tun['ray_start_s']:.1f}; " if phase == "cold" else "")
            + f"slot free to trainable begun {tun['start_wait_sum_s']:.1f}, set-up in the trial (imports, JAX "
            f"start) {tun['set_up_sum_s']:.1f}, last report to fit's end {tun['wind_down_s']:.1f}; "
            f"{tun['processes']:.0f} trial processes |",
            f"| {phase} | services | {srv['wall_s']:.1f} | {p * srv['wall_s']:.1f} | (trial spans) "
            f"{srv['trial_span_sum_s']:.1f} | | | | {p * srv['wall_s'] - srv['trial_span_sum_s']:.1f} | "
            + (f"`batchlab up` {srv['stack_start_s']:.1f}" if phase == "cold" else "") + " |",
        ]
        notes.append(
            f"- {phase}, Tune - local: wall {tun['wall_s'] - loc['wall_s']:+.1f} s; in the runs "
            f"{tun['wall_time_s_sum_s'] - loc['wall_time_s_sum_s']:+.1f} slot-s (start-up "
            f"{tun['startup_time_s_sum_s'] - loc['startup_time_s_sum_s']:+.1f}, train "
            f"{tun['train_time_s_sum_s'] - loc['train_time_s_sum_s']:+.1f}, rest "
            f"{tun['rest_sum_s'] - loc['rest_sum_s']:+.1f}), outside them "
            f"{tun['outside_runs_s'] - loc['outside_runs_s']:+.1f} slot-s.")
        notes.append(
            f"- {phase}, Tune - services: wall {tun['wall_s'] - srv['wall_s']:+.1f} s; Tune's trials spanned "
            f"{tun['trial_span_sum_s']:.1f} s (trainable begun to report) against the services' "
            f"{srv['trial_span_sum_s']:.1f} s (controller's start to end)"
            + (f"; start-up before any run: Ray start and import {tun['ray_start_s'] + tun['import_s']:.1f} s "
               f"against `batchlab up` {srv['stack_start_s']:.1f} s" if phase == "cold" else "") + ".")
    return "\n".join([
        "## Against the peer users would pick: the same study through Ray Tune",
        "",
        f"{s['trials']} tuning trial(s) and {s['reruns']} seed rerun(s) of {s['workload']} "
        f"(batch {s['point']['batch_size']}, {s['point']['step_budget']} steps, evaluation every "
        f"{s['point']['eval_every_steps']}), {p} run(s) at once on every path, {s['threads_per_run']} "
        f"XLA:CPU thread(s) per run ({s['plan']}). Tune runs the exact runs batchlab's protocol produced "
        "(hyperparameters and seeds read from the local run's results), each trial calling the function "
        "`batchlab local run` trains a run with (`batchlab.runner.local._train`), trial resources "
        f"`{{'cpu': T}}`, `max_concurrent_trials={p}`, Tune's defaults otherwise. Cold: new processes, "
        "empty compilation caches, Ray / the stack started inside the figure. Warm: a second identical "
        f"study in the same process / stack / Ray session. {s['rounds']} round(s), the order rotating; "
        f"load average after each round {r['load_1min']}.",
        "",
        "| path | runs | wall seconds (median) | runs/hour | per round |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
        "| ratio (wall time) | value | target | met |",
        "|---|---:|---|---|",
        f"| services / Tune, cold | {q['services_over_tune_cold']:.3f} | <= {TARGET} | {met(q['services_over_tune_cold'])} |",
        f"| services / Tune, warm | {q['services_over_tune_warm']:.3f} | <= {TARGET} | {met(q['services_over_tune_warm'])} |",
        f"| local / Tune, cold | {q['local_over_tune_cold']:.3f} | (none) | |",
        f"| local / Tune, warm | {q['local_over_tune_warm']:.3f} | (none) | |",
        "",
        f"Fairness check: the same trial must give the same numbers on every path. {fair['compared']} "
        "executions compared with round 1's local cold run (local and Tune: outcome, curve, final metrics, "
        "steps to target; services: outcome, final metrics and steps to target, what its API returns): "
        + ("all identical." if fair["identical"] else f"DIFFERENT: {', '.join(fair['mismatches'][:10])}."),
        "",
        f"| trial | seed | final {fair['metric']}: local | Tune | services |",
        "|---|---:|---:|---:|---:|",
        *trial_rows,
        "",
        "Where the time went (medians over rounds; seconds, or slot-seconds = seconds x the "
        f"{p} slots). Run columns sum the RunResults of `train_and_evaluate`: its wall, of which start-up "
        "(until the first step ended: compilation, first batch), train (the steps) and rest (set-up before "
        "the first step and the evaluations). Outside runs = slots x wall - the runs' wall (process "
        "starts, imports, JAX start, Ray, scheduling, storing results). The controller's API gives the "
        "services' trials only their spans (evaluation by the evaluation service included).",
        "",
        "| phase | path | wall | slot-s | runs' wall | start-up | train | rest | outside runs | measured besides |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *where,
        "",
        *notes,
        "",
    ])
