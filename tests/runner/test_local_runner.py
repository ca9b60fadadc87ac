"""The local runner: resumable, deterministic, and every shipped spec validates."""

import json
import math
from pathlib import Path

import pytest
from tiny_spec import TINY, derive_other_learning_rates

from batchlab.runner import ResultStore, run_experiment
from batchlab.search import SpecError, expand_studies, load_spec
from batchlab.train.workloads import workload_names

ROOT = Path(__file__).resolve().parents[2]

@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates_with_known_workloads(path):
    assert expand_studies(load_spec(path, known_workloads=set(workload_names())))


def test_unknown_workload_names_the_field():
    bad = json.loads(json.dumps(TINY))
    bad["workloads"][0]["workload"] = "mnist2d"
    with pytest.raises(SpecError, match=r"workloads\[0\]\.workload"):
        load_spec(bad, known_workloads=set(workload_names()))


def _fake_train(calls):
    def train(request, study, data_dir):
        calls.append(request.name)
        acc = 0.2 + 0.1 * request.trial_index + 0.01 * (request.seed % 7)
        diverged = request.hyperparameters["optimizer"]["learning_rate"]["peak_value"] > 0.9
        curve = [{"step": 10.0, "validation/accuracy": acc, "train/accuracy": acc}]
        return {
            "outcome": "DIVERGED" if diverged else "SUCCEEDED",
            "steps_completed": 20,
            "curve": curve,
            "final_metrics": curve[-1],
            "steps_to_target": 10 if acc >= 0.3 else None,
        }

    return train


def test_runner_resumes_from_stored_runs_and_refuses_another_spec(tmp_path):
    calls = []
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    store = ResultStore(tmp_path)
    assert store.read_experiment()["status"] == "SUCCEEDED"
    first = list(calls)
    assert len(first) >= 3  # 2 feasible tuning trials + 1 rerun
    study_id = store.read_experiment()["studies"][0]["id"]
    assert store.study_path(study_id).exists()
    # Running again finds everything done: nothing is trained twice.
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    assert calls == first
    # Deleting the study summary and one run: only that run is redone.
    store.study_path(study_id).unlink()
    victim = sorted((tmp_path / "runs" / study_id).glob("*.json"))[-1]
    victim.unlink()
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    assert len(calls) == len(first) + 1
    other = json.loads(json.dumps(TINY))
    other["name"] = "tiny2"
    with pytest.raises(ValueError, match="different spec"):
        run_experiment(other, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)


@pytest.mark.slow
def test_real_runs_are_deterministic(tmp_path, small_data_dir):
    outs = []
    for name in ("a", "b"):
        out = run_experiment(TINY, tmp_path / name, data_dir=small_data_dir, progress=False, write_report=False)
        studies = sorted((out / "studies").glob("*.json"))
        outs.append([json.loads(p.read_text())["score"] for p in studies])
        runs = sorted((out / "runs").rglob("*.json"))
        for p in runs:
            result = json.loads(p.read_text())["result"]
            assert result["outcome"] in ("SUCCEEDED", "DIVERGED")
            assert not math.isnan(result["final_metrics"]["validation/accuracy"])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("max_total, failed_status", [(3, "SUCCEEDED"), (2, "FAILED")])
def test_abandoned_runs_fail_the_experiment_only_when_a_budgeted_run_is_missing(
        tmp_path, max_total, failed_status):
    """The services' rule (tests/services/controller/test_controller_attempts.py): trial 0
    fails for good; with room in max_total_trials another trial takes its place."""
    calls = []
    ok = _fake_train(calls)

    def train(request, study, data_dir):
        if request.trial_index == 0:
            return {"outcome": "FAILED", "error": "out of memory", "steps_completed": 3,
                    "curve": [], "final_metrics": {}, "steps_to_target": None}
        return ok(request, study, data_dir)

    spec = {**json.loads(json.dumps(TINY)), "trials_per_study": 2, "max_total_trials": max_total,
            "max_attempts": 1}
    run_experiment(spec, tmp_path, train_fn=train, progress=False, write_report=False,
                   in_process=True)
    experiment = json.loads((tmp_path / "experiment.json").read_text())
    assert experiment["status"] == failed_status
    if failed_status == "FAILED":
        assert "1 of 2 tuning trials feasible within max_total_trials (abandoned: trial 0)" \
            in experiment["error"]
    else:
        assert "error" not in experiment


def test_a_folder_resumed_by_other_code_names_every_version_in_its_report(tmp_path, monkeypatch):
    """A resumed experiment.json said only the last commit, as if it had made every run."""
    from batchlab.report import write_report
    from batchlab.runner import local

    calls = []
    versions = iter([{"commit": "aaaa", "dirty": True, "version": "0.1.0"},
                     {"commit": "bbbb", "dirty": False, "version": "0.1.0"}])
    monkeypatch.setattr(local, "code_version", lambda: version)
    version = next(versions)
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    done = len(calls)
    victim = sorted((tmp_path / "runs").glob("*/*.json"))[-1]
    victim.unlink()  # one run is left for the second session
    version = next(versions)
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    sessions = ResultStore(tmp_path).read_experiment()["sessions"]
    assert [s["code"]["commit"] for s in sessions] == ["aaaa", "bbbb"]
    assert [s["runs_before"] for s in sessions] == [0, done - 1]
    report = write_report(tmp_path, tmp_path / "report").read_text()
    assert ("Run files by the code that wrote them, as each file records it: "
            f"{done - 1} by commit `aaaa` with uncommitted changes (batchlab 0.1.0); "
            "1 by commit `bbbb` (batchlab 0.1.0)." in report), report


def test_run_files_placed_before_the_first_session_are_not_credited_to_its_code(tmp_path, monkeypatch):
    """Runs copied in from another experiment with the same studies: the report said the first
    session's commit produced every run, the copied ones included."""
    from batchlab.report import write_report
    from batchlab.runner import local

    source, target = tmp_path / "source", tmp_path / "target"
    monkeypatch.setattr(local, "code_version", lambda: {"commit": "aaaa", "dirty": False, "version": "0.1.0"})
    run_experiment(TINY, source, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    runs = sorted((source / "runs").glob("*/*.json"))
    for path in runs[:2]:  # two run files copied in before the runner ever ran on target
        copy = target / "runs" / path.parent.name / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(local, "code_version", lambda: {"commit": "bbbb", "dirty": False, "version": "0.1.0"})
    run_experiment(TINY, target, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    assert [s["runs_before"] for s in ResultStore(target).read_experiment()["sessions"]] == [2]
    report = write_report(target, target / "report").read_text()
    # The copies record the code that wrote them in the other folder: credited to it.
    total = len(list((target / "runs").glob("*/*.json")))
    assert "Run files by the code that wrote them, as each file records it: " in report
    assert (f"{total - 2} by commit `bbbb` (batchlab 0.1.0)" in report
            and "2 by commit `aaaa` (batchlab 0.1.0)" in report and "record no code" not in report)
    assert "Results produced by the code at commit `bbbb`" not in report


def test_run_files_placed_between_sessions_are_not_credited_to_either(tmp_path, monkeypatch):
    """The folder's session list said from which run file on each session's code ran, so a file
    placed there between two sessions was credited to the first one's code."""
    from batchlab.report import write_report
    from batchlab.runner import local

    monkeypatch.setattr(local, "code_version", lambda: {"commit": "aaaa", "dirty": False, "version": "0.1.0"})
    run_experiment(TINY, tmp_path, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    runs = sorted((tmp_path / "runs").glob("*/*.json"))
    stripped = json.loads(runs[0].read_text())
    del stripped["written_by"]  # as an older batchlab, or a hand-made copy, wrote it
    runs[0].write_text(json.dumps(stripped))
    runs[-1].unlink()
    monkeypatch.setattr(local, "code_version", lambda: {"commit": "bbbb", "dirty": False, "version": "0.1.0"})
    run_experiment(TINY, tmp_path, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    report = write_report(tmp_path, tmp_path / "report").read_text()
    assert (f"{len(runs) - 2} by commit `aaaa` (batchlab 0.1.0); 1 by commit `bbbb` (batchlab 0.1.0); "
            "1 record no code" in report), report


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_stored_runs_made_by_code_deriving_other_hyperparameters_are_refused(tmp_path, monkeypatch):
    """A resumed folder's runs were read back by trial and seed only: a code change in how
    hyperparameters are derived mixed old runs into new verdicts without a word."""
    run_experiment(TINY, tmp_path, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    victim = sorted((tmp_path / "runs").glob("*/*.json"))[-1]
    victim.unlink()  # something is left to do, so a run would start
    before = _snapshot(tmp_path)
    derive_other_learning_rates(monkeypatch, 1.5)
    calls = []
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate\.peak_value: stored .*, "
                                         r"expected .*use a new folder"):
        run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False,
                       write_report=False, in_process=True)
    assert calls == [] and _snapshot(tmp_path) == before  # nothing ran, nothing was rewritten


def test_run_files_copied_from_an_experiment_with_another_search_seed_are_refused(tmp_path):
    other = json.loads(json.dumps(TINY))
    other["search_seed"] = TINY.get("search_seed", 0) + 1
    source, target = tmp_path / "source", tmp_path / "target"
    run_experiment(other, source, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    path = sorted((source / "runs").glob("*/*.json"))[0]
    copy = target / "runs" / path.parent.name / path.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=rf"{path.name} is not the run this spec asks for .*seed: "):
        run_experiment(TINY, target, train_fn=_fake_train([]), progress=False, write_report=False,
                       in_process=True)
    assert not (target / "experiment.json").exists()
    # A stored replica the study never has is named too.
    stored = json.loads(copy.read_text())
    stored["request"]["replica"] = 99
    copy.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"not a run of study .*replica must be in 0\.\."):
        run_experiment(TINY, target, train_fn=_fake_train([]), progress=False, write_report=False,
                       in_process=True)


def _copy_under(name):
    def change(path):
        target = path.parent / name
        target.write_bytes(path.read_bytes())
        return target
    return change


def _edit_request(**fields):
    def change(path):
        stored = json.loads(path.read_text())
        stored["request"].update(fields)
        path.write_text(json.dumps(stored))
        return path
    return change


def _garbage(path):
    path.write_bytes(b"\xff\xfe\x00binary")
    return path


def _foreign_study(path):
    target = path.parent.parent / "some.other.study" / path.name
    target.parent.mkdir()
    target.write_bytes(path.read_bytes())
    return target.parent


@pytest.mark.parametrize("change, message", [
    (_copy_under("t0_r0_a2.json"), r"t0_r0_a2\.json is not the run .*the file holds the run "
                                   r"t0_r0_a1\.json"),
    (_copy_under("t7_r0_a1.json"), r"t7_r0_a1\.json is not the run .*the file holds the run "
                                   r"t0_r0_a1\.json"),
    (_edit_request(replica=False), r"replica must be an integer, got False"),
    (_garbage, r"t0_r0_a1\.json: malformed run record"),
    (_foreign_study, r"some\.other\.study.* holds runs of a study this spec does not have"),
], ids=["copy-as-attempt-2", "copy-as-trial-7", "replica-bool", "binary", "foreign-study"])
def test_a_folder_with_a_run_file_that_is_not_its_run_is_refused_untouched(tmp_path, change,
                                                                            message):
    """Review findings: a copy under another file name passed the check and then crashed the
    protocol mid-run; a binary file raised a bare UnicodeDecodeError; replica False was 0."""
    run_experiment(TINY, tmp_path, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    first = sorted((tmp_path / "runs").glob("*/t0_r0_a1.json"))[0]
    change(first)
    before = _snapshot(tmp_path)
    calls = []
    with pytest.raises(ValueError, match=message):
        run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False,
                       write_report=False, in_process=True)
    assert calls == [] and _snapshot(tmp_path) == before


def test_a_report_names_run_files_that_are_not_the_runs_its_spec_asks_for(tmp_path):
    """`batchlab report` rebuilt a table from a run file copied in from an experiment with
    another search seed without a word (review finding); the runner refuses such a folder."""
    from batchlab.report import write_report

    other = json.loads(json.dumps(TINY))
    other["search_seed"] = TINY["search_seed"] + 1
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for spec, out in ((TINY, mine), (other, theirs)):
        run_experiment(spec, out, train_fn=_fake_train([]), progress=False, write_report=False,
                       in_process=True)
    clean = write_report(mine, tmp_path / "clean").read_text()
    assert "not the runs this spec asks for" not in clean
    source = sorted((theirs / "runs").glob("*/t0_r0_a1.json"))[0]
    target = mine / "runs" / source.parent.name / source.name
    target.write_bytes(source.read_bytes())
    report = write_report(mine, tmp_path / "report").read_text()
    assert ("**1 run files are not the runs this spec asks for**" in report
            and f"`{source.parent.name}/t0_r0_a1.json` (seed: stored" in report), report


def test_a_report_names_folders_of_run_files_that_are_not_its_studies(tmp_path):
    """The runner refuses such a folder; the report read it silently (a log line only)."""
    from batchlab.report import write_report

    run_experiment(TINY, tmp_path / "mine", train_fn=_fake_train([]), progress=False,
                   write_report=False, in_process=True)
    source = sorted((tmp_path / "mine" / "runs").glob("*/t0_r0_a1.json"))[0]
    (tmp_path / "mine" / "runs" / "old_study").mkdir()  # empty: not named
    stray = tmp_path / "mine" / "runs" / "another.spec.study"
    stray.mkdir()
    (stray / "t0_r0_a1.json").write_bytes(source.read_bytes())
    report = write_report(tmp_path / "mine", tmp_path / "report").read_text()
    assert ("**Not read: 1 folder(s) of run files that are not studies of this experiment** "
            "(`runs/another.spec.study`)") in report, report
    assert "old_study" not in report


def test_an_empty_or_editor_made_folder_under_runs_does_not_block_a_resume(tmp_path):
    run_experiment(TINY, tmp_path, train_fn=_fake_train([]), progress=False, write_report=False,
                   in_process=True)
    (tmp_path / "runs" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "runs" / "old_study").mkdir()
    calls = []
    run_experiment(TINY, tmp_path, train_fn=_fake_train(calls), progress=False, write_report=False,
                   in_process=True)
    assert calls == []
