"""The determinism contract, guarded: a small shipped study run end to end gives exactly the
numbers committed for this machine kind in tests/runner/data/determinism/<kind>.json.

Same code, spec, data and machine kind give the same numbers
(batchlab.runner.provenance.machine_kind: the architecture, the CPU features XLA:CPU compiles
for, jaxlib). A change that alters results fails here until the expected digest is regenerated
on purpose (the commands are in experiments/examples/determinism.yaml and in the failure
message), with the reason in the commit. A new jaxlib or any other software that changes
numbers fails here too (software is not part of the kind). On a kind with no committed digest
the study runs twice and must give the same numbers both times, and the test warns that no
committed digest guards that kind: the contract holds there, but only a committed digest
catches a change of code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from batchlab.runner import run_experiment
from batchlab.runner.digest import compare_digests, digest
from batchlab.runner.provenance import machine_kind, machine_kind_id

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "experiments" / "examples" / "determinism.yaml"
EXPECTED_DIR = Path(__file__).parent / "data" / "determinism"
EXPECTED = EXPECTED_DIR / f"{machine_kind_id()}.json"
REGENERATE = (
    "If the change is meant to alter results, regenerate the expected digest and give the "
    "reason in the commit:\n"
    f"  batchlab local run {SPEC.relative_to(ROOT)} --out /tmp/determinism\n"
    f"  batchlab digest /tmp/determinism > {EXPECTED.relative_to(ROOT)}")


def _committed() -> list[Path]:
    return sorted(EXPECTED_DIR.glob("*.json"))


def test_shipped_study_reproduces_its_committed_numbers(tmp_path, small_data_dir):
    out = run_experiment(SPEC, tmp_path / "determinism", data_dir=small_data_dir,
                         progress=False)
    found = digest(out)
    assert found["machine_kinds"] == [json.loads(json.dumps(machine_kind(), sort_keys=True))]
    assert len(found["runs"]) == 20
    assert len(found["verdicts"]) == 1  # 6 seeds per arm: the bootstrap runs
    if EXPECTED.exists():
        expected = json.loads(EXPECTED.read_text())
        differences = compare_digests(found, expected)
        assert not differences, "\n".join(differences) + "\n" + REGENERATE
        return
    # A machine kind with no committed digest: the contract checked on it by a second run;
    # the same run files and spec as a committed kind's.
    warnings.warn(f"no committed determinism digest for this machine kind ({EXPECTED.name}): "
                  "checked that two runs agree, not that the numbers match a committed digest. "
                  + REGENERATE, stacklevel=1)
    again = digest(run_experiment(SPEC, tmp_path / "again", data_dir=small_data_dir,
                                  progress=False))
    differences = compare_digests(again, found)
    assert not differences, "\n".join(differences)
    other = json.loads(_committed()[0].read_text())
    assert sorted(found["runs"]) == sorted(other["runs"]) and found["spec"] == other["spec"]


def test_a_digest_is_committed_for_the_machine_kind_that_runs_ci():
    # Each committed digest is named by the kind recorded in it, and is that kind's only one.
    files = _committed()
    assert files, "no committed determinism digest"
    for path in files:
        kinds = json.loads(path.read_text())["machine_kinds"]
        assert len(kinds) == 1 and path.stem == machine_kind_id(kinds[0]), path


def test_digest_ignores_timings_and_sees_a_changed_number(tmp_path):
    expected = json.loads(_committed()[0].read_text())
    changed = json.loads(json.dumps(expected))
    run = next(iter(changed["runs"].values()))
    run["result"]["curve"][0]["validation/accuracy"] += 1e-7
    differences = compare_digests(changed, expected)
    assert len(differences) == 1 and "validation/accuracy" in differences[0]
    assert "wall_time_s" not in json.dumps(expected)
    verdict = next(iter(changed["verdicts"].values()))
    verdict["metric"][1] += 1e-9  # a change to the resampling moves an interval's end
    assert len(compare_digests(changed, expected)) == 2


def test_digest_ignores_which_session_wrote_a_run_file(tmp_path):
    """Every run file names the commit that wrote it; the contract covers results only, so a
    new commit with the same numbers must not fail the shipped-study test."""
    from runner_helpers import _result, fake_spec

    out = run_experiment(fake_spec("provenance", optimizers=1, trials=2, reruns=1), tmp_path,
                         train_fn=lambda request, study, data_dir: _result(request),
                         progress=False, write_report=False, in_process=True)
    before = digest(out)
    path = sorted((out / "runs").glob("*/*.json"))[0]
    stored = json.loads(path.read_text())
    assert stored["written_by"]["code"]
    stored["written_by"] = {"started_at": "later", "code": {"commit": "another"}}
    path.write_text(json.dumps(stored))
    assert compare_digests(digest(out), before) == []
    stored["result"]["final_metrics"]["validation/accuracy"] += 1e-7
    path.write_text(json.dumps(stored))
    assert len(compare_digests(digest(out), before)) == 1
