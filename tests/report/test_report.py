"""Reports from stored results: loading, table numbers, figures, determinism and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from synthetic_results import SEEDS, Synthetic, build_results

from batchlab.paths import get_path
from batchlab.report import write_report
from batchlab.report.results import load_results, protocol_studies
from batchlab.report.tables import (
    best_hyperparameters_table,
    comparison_table,
    effort_table,
    markdown_table,
)
from batchlab.report.verdicts import decide_point, verdict_section
from batchlab.search.compare import Arm, Verdict, compare_arms
from batchlab.search.study import Goal

WORKLOAD = "mnist1d_resnet1d"
POINTS = {128: 100, 512: 50}


def _row(table: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is label."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def _expected(key: str) -> tuple[np.ndarray, np.ndarray]:
    """(validation with a diverged seed at accuracy 0, train of the seeds that did not diverge)."""
    finished = [v for v in SEEDS[key] if v is not None]
    return (np.array([0.0 if v is None else v[0] for v in SEEDS[key]]),
            np.array([t for _, t in finished]))


def _iqr_text(values: np.ndarray) -> str:
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return f"{median:.4f} [{q25:.4f}, {q75:.4f}]"


# ----------------------------------------------------------------------------- loading


def test_load_results_reads_every_file(synthetic: Synthetic):
    experiment = load_results(synthetic.root)
    assert experiment.name == "synthetic" and experiment.status == "SUCCEEDED"
    assert [s.id for s in experiment.studies] == [s.id for s in synthetic.studies.values()]
    assert experiment.run_count() == 4 * 9
    study = experiment.study(synthetic.studies["lars_pipeline.b512"].id)
    assert study.stored and study.done and study.best_trial == 2
    assert study.info.weights_optimizer == "lars"
    assert study.info.bias_bn_optimizer == "heavy_ball"
    assert study.info.train_metric == "train/accuracy"
    # Runs in (trial, replica, attempt) order; NaN stored as null reads back as NaN.
    assert [(r.trial_index, r.replica, r.attempt) for r in study.runs][:3] == [
        (0, 0, 1), (0, 0, 2), (1, 0, 1)]
    diverged = study.runs[2]
    assert diverged.outcome.name == "DIVERGED" and diverged.diverged_step == 30
    assert math.isnan(diverged.final_metrics["validation/accuracy"])
    assert len(study.scored_runs()) == 5 and len(study.feasible_scored_runs()) == 4
    with pytest.raises(TypeError):
        study.info.optimizer_config["weights"] = {}  # read-only view


def test_study_rebuilt_from_the_stored_spec_matches_expand_studies(synthetic: Synthetic):
    experiment = load_results(synthetic.root)
    rebuilt = protocol_studies(experiment.spec)
    assert experiment.protocol == rebuilt
    for study in synthetic.studies.values():
        for trial in range(4):
            assert rebuilt[study.id].hyperparameters(trial) == study.hyperparameters(trial)
            assert rebuilt[study.id].tuning_seed(trial) == study.tuning_seed(trial)
            assert rebuilt[study.id].rerun_seeds(trial) == study.rerun_seeds(trial)


def test_scores_computed_from_run_files_equal_the_stored_ones(tmp_path: Path):
    stored = load_results(build_results(tmp_path / "a").root)
    computed = load_results(build_results(tmp_path / "b", without_scores=tuple(SEEDS)).root)
    for a, b in zip(stored.studies, computed.studies, strict=True):
        assert a.stored and not b.stored
        assert a.score == b.score


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("optimizer", ["nesterov", "lars_pipeline"])
@pytest.mark.parametrize("batch_size", [128, 512])
def test_comparison_table_numbers_match_numpy(synthetic: Synthetic, optimizer, batch_size):
    experiment = load_results(synthetic.root)
    key = f"{optimizer}.b{batch_size}"
    table = comparison_table(experiment, WORKLOAD, batch_size, POINTS[batch_size])
    row = _row(table, optimizer)
    validation, train = _expected(key)
    assert row[3] == _iqr_text(validation)
    assert row[4] == f"{validation.min():.4f}–{validation.max():.4f}"
    assert row[5] == _iqr_text(train)
    diverged = sum(v is None for v in SEEDS[key])
    assert row[6] == ("5/5" if not diverged else f"5/5 ({diverged} diverged)")
    steps = np.array(synthetic.steps_to_target[key])
    reached = int(np.isfinite(steps).sum())
    assert row[7] == f"{reached}/5 ({reached / 5:.0%})"
    median_steps = np.median(steps)
    assert row[8] == ("never" if math.isinf(median_steps) else f"{int(median_steps):,}")
    assert row[9] == "2 / 1 / 3"  # feasible / diverged / total trials
    steps_run = sum(r.steps_run for r in synthetic.records[key])
    assert row[10] == f"{steps_run:,}"


def test_unreached_target_reads_never(synthetic: Synthetic):
    table = comparison_table(load_results(synthetic.root), WORKLOAD, 512, 50)
    assert _row(table, "nesterov")[8] == "never"
    assert _row(table, "nesterov")[7] == "0/5 (0%)"


def test_effort_table_counts_trials_diverged_and_examples(synthetic: Synthetic):
    table = effort_table(load_results(synthetic.root))
    lines = [line for line in table.splitlines() if line.startswith(f"| {WORKLOAD}")]
    assert len(lines) == 4
    seen = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = f"{cells[3]}.b{cells[1]}"
        seen.append(key)
        study, records = synthetic.studies[key], synthetic.records[key]
        total = sum(r.steps_run for r in records)
        assert cells[4:10] == ["3", "2", "1", "0", str(len(records)), "1"]
        assert cells[12] == f"{total:,}"
        assert cells[13] == f"{total * study.batch_size:,}"
    # Grouped by point, optimizers in spec order within it.
    assert seen == ["nesterov.b128", "lars_pipeline.b128", "nesterov.b512", "lars_pipeline.b512"]


def test_best_hyperparameters_table_shows_the_searched_paths(synthetic: Synthetic):
    experiment = load_results(synthetic.root)
    table = best_hyperparameters_table(experiment, "lars_pipeline")
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    # Tuned paths only: the tied bias_bn path and the fixed momentum are left out.
    assert header[3:5] == ["search", "best trial"]
    assert header[5:] == ["weights.learning_rate.peak_value", "weights.weight_decay"]
    best = synthetic.studies["lars_pipeline.b128"].hyperparameters(2)
    row = _row(table, WORKLOAD)
    assert row[3:5] == ["0", "2"]
    assert row[5] == f"{get_path(best, 'optimizer.weights.learning_rate.peak_value'):.4g}"
    assert row[6] == f"{get_path(best, 'optimizer.weights.weight_decay'):.4g}"


def _arm(key: str, label: str, steps: list[float]) -> Arm:
    values = tuple(0.0 if v is None else v[0] for v in SEEDS[key])
    return Arm(label, (values,), (tuple(math.isfinite(x) for x in steps),))


@pytest.mark.parametrize("batch_size", [128, 512])
def test_verdicts_are_decided_on_every_seed_with_diverged_ones_at_zero(synthetic: Synthetic,
                                                                      batch_size):
    experiment = load_results(synthetic.root)
    (pair,) = decide_point(experiment, WORKLOAD, batch_size, POINTS[batch_size])
    assert (pair.verdict.a, pair.verdict.b) == ("nesterov", "lars_pipeline")
    steps = synthetic.steps_to_target
    expected = compare_arms(
        _arm(f"nesterov.b{batch_size}", "nesterov", steps[f"nesterov.b{batch_size}"]),
        _arm(f"lars_pipeline.b{batch_size}", "lars_pipeline",
             steps[f"lars_pipeline.b{batch_size}"]),
        goal=Goal.MAXIMIZE, metric_margin=0.006, fraction_margin=0.25)
    assert pair.verdict == expected
    assert (pair.verdict.seeds_a, pair.verdict.seeds_b) == (5, 5)  # the diverged seed counts


def test_verdict_section_states_the_decision_and_its_intervals(synthetic: Synthetic):
    experiment = load_results(synthetic.root)
    close = verdict_section(experiment, WORKLOAD, 128, 100)
    # Medians 0.70 vs 0.705 over 5 seeds each: neither matched nor apart at margin 0.006.
    assert "**not enough evidence**" in close
    row = _row(close, "`nesterov` vs `lars_pipeline`")
    assert row[2].startswith("-0.0050 [") and row[2].endswith("(±0.006)")
    assert row[3].startswith("+0.00 [+0.00, +0.00]")  # every seed of both reached 0.6
    apart = decide_point(experiment, WORKLOAD, 512, 50)[0].verdict
    # 3 of 5 LARS seeds reach 0.6 and no Nesterov seed does: LARS is ahead on reaching it.
    assert apart.fraction.verdict is Verdict.B_AHEAD
    assert apart.verdict is Verdict.B_AHEAD
    assert "**`lars_pipeline` ahead**" in verdict_section(experiment, WORKLOAD, 512, 50)


def test_markdown_table_escapes_pipes_and_checks_widths():
    table = markdown_table(["a", "b"], [["x|y", "1"]])
    assert "x\\|y" in table
    with pytest.raises(ValueError, match="row 0"):
        markdown_table(["a", "b"], [["only one"]])


# ----------------------------------------------------------------------------- the report


def test_write_report_writes_markdown_and_valid_pngs(synthetic: Synthetic):
    path = write_report(synthetic.root)
    assert path == synthetic.root / "report" / "report.md"
    text = path.read_text()
    for heading in ("# Optimizer comparison: `synthetic`", "## How this report was produced",
                    "## Spec", "## Tuning effort", "## Best hyperparameters"):
        assert heading in text
    assert "2025-01-02T03:04:05+00:00" in text  # the stored timestamps only
    links = [line[line.index("](") + 2:-1] for line in text.splitlines()
             if line.startswith("![")]
    assert len(links) == 2 * 4 + 2
    for heading in ("## Spec check", "## How verdicts are decided", "**Verdicts**"):
        assert heading in text
    assert "[few-trials-per-dimension]" in text  # the spec check is echoed
    assert "percentile-bootstrap" in text and "margin ±0.006" in text
    for link in links:
        image = matplotlib.image.imread(path.parent / link)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not blank


def test_report_is_byte_identical_when_rebuilt(synthetic: Synthetic, tmp_path: Path):
    first = write_report(synthetic.root, tmp_path / "one")
    second = write_report(synthetic.root, tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()
    pngs = sorted(p.name for p in (tmp_path / "one" / "figures").glob("*.png"))
    assert pngs and all((tmp_path / "one" / "figures" / n).read_bytes()
                        == (tmp_path / "two" / "figures" / n).read_bytes() for n in pngs)


def test_running_experiment_is_reported_as_in_progress(tmp_path: Path):
    synthetic = build_results(tmp_path / "results", without_scores=tuple(SEEDS),
                              reruns_done=2, status="RUNNING")
    experiment = load_results(synthetic.root)
    study = experiment.studies[0]
    assert not study.stored and not study.done and study.score.phase == "reruns"
    assert study.score.seeds.finished == 2
    table = comparison_table(experiment, WORKLOAD, 128, 100)
    assert _row(table, "nesterov (in progress)")[6] == "2/5"
    assert "in progress, scored from its run files so far" in table
    text = write_report(synthetic.root).read_text()
    assert "Status **RUNNING**" in text and "provisional" in text
    assert "(in progress)**" in text


def test_study_without_runs_is_shown_with_dashes(tmp_path: Path):
    synthetic = build_results(tmp_path / "results", without_scores=("nesterov.b512",),
                              status="RUNNING")
    folder = synthetic.root / "runs" / synthetic.studies["nesterov.b512"].id
    for path in folder.iterdir():
        path.unlink()
    experiment = load_results(synthetic.root)
    row = _row(comparison_table(experiment, WORKLOAD, 512, 50), "nesterov (in progress)")
    assert row[3] == "—" and row[8] == "—" and row[9] == "0 / 0 / 0"
    (pair,) = decide_point(experiment, WORKLOAD, 512, 50)
    assert pair.verdict.verdict is Verdict.NOT_ENOUGH_EVIDENCE
    assert "too few seeds: 0 and 5 finished" in verdict_section(experiment, WORKLOAD, 512, 50)
    write_report(synthetic.root)  # every figure copes with the missing data


# ----------------------------------------------------------------------------- errors


def test_missing_experiment_json_names_the_file(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="experiment.json"):
        load_results(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such results folder"):
        write_report(tmp_path / "absent")


def _first_run(synthetic: Synthetic) -> Path:
    return synthetic.root / "runs" / synthetic.studies["nesterov.b128"].id / "t0_r0_a2.json"


def test_malformed_json_names_the_file(synthetic: Synthetic):
    path = _first_run(synthetic)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"t0_r0_a2\.json: not valid JSON"):
        load_results(synthetic.root)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["result"].pop("outcome"), r"result\.outcome: missing"),
    (lambda d: d["result"].update(outcome="EXPLODED"), r"result\.outcome: must be one of"),
    (lambda d: d["request"].update(trial_index="zero"), r"request\.trial_index: must be an"),
    (lambda d: d["result"]["final_metrics"].update({"validation/accuracy": "high"}),
     r"result\.final_metrics\.validation/accuracy"),
])
def test_malformed_run_field_names_file_and_field(synthetic: Synthetic, edit, field):
    path = _first_run(synthetic)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"t0_r0_a2\.json: {field}"):
        load_results(synthetic.root)


def test_malformed_experiment_and_study_files_name_file_and_field(synthetic: Synthetic):
    experiment_path = synthetic.root / "experiment.json"
    original = experiment_path.read_text()
    data = json.loads(original)
    del data["studies"][1]["batch_size"]
    experiment_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"experiment\.json: studies\[1\]\.batch_size: missing"):
        load_results(synthetic.root)
    experiment_path.write_text(original)
    study_path = synthetic.root / "studies" / f"{synthetic.studies['nesterov.b128'].id}.json"
    data = json.loads(study_path.read_text())
    del data["score"]["effort"]
    study_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{study_path.name}: score\.effort: missing"):
        load_results(synthetic.root)


def test_report_library_does_not_import_jax():
    code = ("import sys, batchlab.report, batchlab.report.figures; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax',"
            " 'google')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_effort_table_says_why_attempts_failed(synthetic: Synthetic):
    # The controller records why an attempt failed and whether it counts toward max_attempts.
    path = synthetic.root / "runs" / synthetic.studies["nesterov.b128"].id / "t0_r0_a1.json"
    data = json.loads(path.read_text())
    assert data["result"]["outcome"] == "FAILED"
    data["result"].update(failure="CONTROLLER", counted=False)
    path.write_text(json.dumps(data))
    table = effort_table(load_results(synthetic.root))
    row = next(line for line in table.splitlines() if "| nesterov |" in line and "| 128 |" in line)
    assert "1 (1 controller, not counted)" in row


def test_spec_table_shows_a_point_that_overrides_the_evaluation_period(tmp_path: Path):
    # scaling.yaml evaluates its small batch sizes more often than the workload's default: the
    # report's spec table must not show the default as every point's period.
    import copy

    from synthetic_results import SPEC

    spec = copy.deepcopy(SPEC)
    spec["workloads"][0]["points"][0]["eval_every_steps"] = 5
    synthetic = build_results(tmp_path / "r", spec=spec)
    text = write_report(synthetic.root).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `mnist1d_resnet1d` |"))
    assert "128 × 100 steps (eval every 5 steps), 512 × 50 steps" in row, row
