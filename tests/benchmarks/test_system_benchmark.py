"""The system benchmark's report: its per-round ratios are the ones its medians are taken of."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from benchmarks import system


def _result(local: list[float], services: list[float]) -> dict:
    return {
        "local_cold_s": [round(x, 1) for x in local],
        "services_cold_s": [round(x, 1) for x in services],
        "local_warm_s": [3.0] * 3, "services_warm_s": [2.9] * 3, "startup_s": [4.2] * 3,
        "ratio_cold": system._paired(local, services),
        "ratio_cold_rounds": system._round_ratios(local, services),
        "ratio_warm": 0.97,
        "large_local_cold_s": [round(x, 1) for x in local],
        "large_services_cold_s": [round(x, 1) for x in services],
        "ratio_cold_large": system._paired(local, services),
        "ratio_cold_large_rounds": system._round_ratios(local, services),
    }


def test_the_per_round_ratios_shown_have_the_median_shown():
    # Seconds whose rounding to 0.1 s moves the ratios: 14.04/7.36 = 1.908 against
    # 14.0/7.4 = 1.892 from the rounded figures, and so the median of the rounds.
    local, services = [6.84, 7.36, 6.96], [11.56, 14.04, 12.04]
    text = system.to_markdown(_result(local, services))
    row = re.search(r"^\| 4 runs \| \[([^\]]+)\] \|", text, re.M)
    assert row is not None
    shown = [float(x) for x in row.group(1).split(",")]
    reported = float(re.search(r"^\| services / local, cold \(4 runs\) \| ([0-9.]+) \|", text,
                               re.M).group(1))
    assert shown == [round(b / a, 3) for a, b in zip(local, services, strict=True)]
    assert abs(float(np.median(shown)) - reported) < 0.0006


def test_results_stored_before_the_rounds_were_kept_still_render():
    r = _result([6.84, 7.36, 6.96], [11.56, 14.04, 12.04])
    del r["ratio_cold_rounds"], r["ratio_cold_large_rounds"]
    assert "| 4 runs | [" in system.to_markdown(r)


def test_the_cpu_table_shows_each_roles_median_and_marks_roles_a_path_lacks():
    r = _result([6.84, 7.36, 6.96], [11.56, 14.04, 12.04])
    train = {"processes": 1, "cpu_s": 80.0, "wait_s": 10.0, "xla_cpu_s": 60.0, "xla_wait_s": 4.0}
    r["reproduction_local_cpu"] = [{"training process": train},
                                   {"training process": {**train, "wait_s": 20.0}}]
    r["reproduction_services_cpu"] = [
        {"training process": {**train, "xla_wait_s": 18.0}, "evaluator": {**train, "cpu_s": 30.0}},
        {"training process": {**train, "xla_wait_s": 22.0}, "evaluator": {**train, "cpu_s": 34.0}}]
    text = system.to_markdown(r)
    assert "| training process | 1 | 80.0 | 15.0 | 1 | 80.0 | 10.0 |" in text
    assert "| (its threads named tf_XLAEigen, XLA:CPU's) | | 60.0 | 4.0 | | 60.0 | 20.0 |" in text
    assert "| evaluator | - | - | - | 1 | 32.0 | 10.0 |" in text
    assert "The sampling itself" not in text  # not stored before it was measured
    # A role absent from a round counts 0 in the CPU median; its processes: the most seen.
    r["reproduction_services_cpu"][1]["controller"] = {**train, "processes": 2, "cpu_s": 4.0}
    text = system.to_markdown(r)
    assert "| controller | - | - | - | 2 | 2.0 | 5.0 |" in text
    r["reproduction_cpu_sampler_s"] = {"local": [0.5, 0.7], "services": [1.5, 1.9]}
    assert "The sampling itself used 0.6 s (local) and 1.7 s (services)" in system.to_markdown(r)
    # The interval the figures were sampled at: as stored, 0.5 s for results stored before it was.
    assert "sampled every 0.5 s, so lower bounds" in system.to_markdown(r)
    r["reproduction_cpu_sample_interval_s"] = 2.0
    assert "sampled every 2 s, so lower bounds" in system.to_markdown(r)
    # Where the figures come from: the timed rounds (results stored before 2026-12-02 02:00 UTC)
    # or a round of their own that nothing times.
    assert "median over the timed rounds, which the sampling ran beside" in system.to_markdown(r)
    r["reproduction_cpu_untimed"] = True
    text = system.to_markdown(r)
    assert "from one more run of the study on each side after the timed rounds" in text
    assert "median over the timed rounds" not in text
    # Stored before the table existed, or measured where /proc has no schedstat: no table.
    del r["reproduction_local_cpu"]
    assert "run-queue wait" not in system.to_markdown(r)


def test_no_timed_figure_is_taken_while_cpu_is_sampled(monkeypatch, tmp_path):
    """run() with the studies stubbed: the timed rounds run without the sampler; the CPU round
    runs the reproduction study once per side, after them, each in a folder of its own."""
    sampling: list[bool] = []  # True while a sampler is active
    calls: list[tuple[str, str, bool, str]] = []  # (side, spec name, sampled, folder)

    class FakeCpuUse:
        def __init__(self, interval_s: float = 0.5, **_: object):
            self.interval_s, self.own_cpu_s = interval_s, 0.1

        def __enter__(self) -> FakeCpuUse:
            sampling.append(True)
            return self

        def __exit__(self, *exc: object) -> None:
            sampling.pop()

        def result(self) -> dict:
            return {"training process": {"processes": 1, "cpu_s": 1.0, "wait_s": 0.0,
                                         "xla_cpu_s": 0.0, "xla_wait_s": 0.0}}

    def fake_local(root, spec=system.SPEC, *, parallel=None, warm=True):
        calls.append(("local", spec["name"], bool(sampling), str(root)))
        return 10.0, (5.0 if warm else None)

    def fake_services(root):
        calls.append(("services", system.SPEC["name"], bool(sampling), str(root)))
        return 11.0, 4.0, 6.0

    def fake_services_cold(root, spec):
        calls.append(("services", spec["name"], bool(sampling), str(root)))
        return 11.0, {"runs": 1, "first_step_s": 1.0, "train_s": 5.0, "rest_of_run_s": 1.0,
                      "outside_runs_s": 4.0}

    monkeypatch.setattr(system, "CpuUse", FakeCpuUse)
    monkeypatch.setattr(system, "_local", fake_local)
    monkeypatch.setattr(system, "_services", fake_services)
    monkeypatch.setattr(system, "_services_cold", fake_services_cold)
    monkeypatch.setattr(system, "_run_results", lambda folder: [])
    monkeypatch.setattr(system, "_reproduction_spec", lambda: {**system.SPEC, "name": "repro"})
    r = system.run(rounds=2)
    timed, sampled = calls[:-2], calls[-2:]
    assert len(timed) == 2 * 2 * 3 and not any(c[2] for c in timed)
    assert [(c[0], c[1], c[2]) for c in sampled] == [("local", "repro", True),
                                                     ("services", "repro", True)]
    # Each side of the CPU round in a folder of its own, none of the timed rounds'.
    assert len({c[3] for c in sampled}) == 2 and not {c[3] for c in sampled} & {c[3] for c in timed}
    assert r["reproduction_cpu_untimed"] is True
    assert r["reproduction_cpu_sample_interval_s"] == system.CPU_SAMPLE_S
    assert len(r["reproduction_local_cpu"]) == len(r["reproduction_services_cpu"]) == 1
    assert len(r["ratio_cold_reproduction_rounds"]) == 2
    assert "from one more run of the study on each side" in system.to_markdown(r)
    calls.clear()
    r = system.run(rounds=1, cpu_round=False)
    assert not any(c[2] for c in calls) and r["reproduction_cpu_sample_interval_s"] is None
    assert "run-queue wait" not in system.to_markdown(r)


def test_the_ratio_interval_is_the_t_interval_of_the_logs():
    # Logs -0.1, 0, 0.1: mean 0, sd 0.1, n 3; t(0.975, 2 df) = 4.3027 (the textbook table), so
    # the half-width is 4.3027 * 0.1 / sqrt(3) = 0.24841 and the interval exp(-+0.24841).
    mean, low, high = system.ratio_interval([np.exp(-0.1), 1.0, np.exp(0.1)])
    assert abs(mean - 1.0) < 1e-12
    assert abs(low - 0.78003) < 1e-4 and abs(high - 1.28199) < 1e-4
    # Ten rounds of the same spread: t(0.975, 9 df) = 2.2622, sd of the logs 0.1054.
    ratios = list(np.exp([-0.1, 0.1] * 5))
    _, low, high = system.ratio_interval(ratios)
    assert abs(np.log(high) - 2.2622 * np.std(np.log(ratios), ddof=1) / np.sqrt(10)) < 1e-4
    for bad in ([1.0], [], [1.0, 0.0], [1.0, float("nan")], [1.0, -1.2]):
        with pytest.raises(ValueError):
            system.ratio_interval(bad)
    # Ties (stored ratios have 3 decimals) would give an interval of width zero: refused.
    with pytest.raises(ValueError, match="no spread"):
        system.ratio_interval([1.05, 1.05, 1.05])
    # The same rounds in another order: geometric means equal but for the last bit.
    a, b = (system.ratio_interval(r)[0] for r in ([1.007, 1.265, 1.284], [1.284, 1.265, 1.007]))
    assert abs(a - b) < 1e-12
    with pytest.raises(ValueError, match="no spread"):
        system.ratio_interval([a, b])


def test_the_target_is_met_only_when_the_whole_interval_is_under_it():
    assert system.verdict(0.95, 1.10) == "yes"
    assert system.verdict(0.95, 1.11) == "not decided"
    assert system.verdict(1.10, 1.30) == "not decided"
    assert system.verdict(1.101, 1.30) == "NO"


def test_the_ratio_table_decides_by_the_interval_not_by_the_median():
    # Medians under the target, but three rounds this spread leave it undecided; a tight set
    # of rounds under it meets it; rounds all far over it miss it.
    r = _result([10.0, 10.0, 10.0], [9.0, 10.5, 12.0])
    r["local_warm_s"], r["services_warm_s"] = [3.0, 3.0, 3.0], [2.9, 2.95, 3.0]
    r["ratio_warm_rounds"] = system._round_ratios(r["local_warm_s"], r["services_warm_s"])
    r["large_services_cold_s"] = [20.0, 21.0, 22.0]
    r["ratio_cold_large_rounds"] = system._round_ratios(r["large_local_cold_s"],
                                                        r["large_services_cold_s"])
    r["ratio_cold_large"] = 2.1
    text = system.to_markdown(r)
    assert re.search(r"^\| services / local, cold \(4 runs\) \| 1\.050 \| [0-9.]+ \[0\.[0-9]+, "
                     r"1\.[0-9]+\] \| <= 1\.1 \| not decided \|$", text, re.M)
    assert re.search(r"^\| services / local, warm \| 0\.970 \| .* \| yes \|$", text, re.M)
    assert re.search(r"^\| services / local, cold \(16 runs\) \| 2\.100 \| .* \| NO \|$", text, re.M)


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def test_the_code_fingerprint_follows_the_system_code_only(tmp_path):
    files = {"services/a.py": "a = 1\n", "libs/b.py": "b = 2\n",
             "protos/c.proto": "syntax = 'proto3';\n", "requirements/all.lock": "x==1\n",
             "pyproject.toml": "[project]\n",
             "benchmarks/d.py": "d\n", "experiments/e.yaml": "e: 1\n"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    first = system.code_fingerprint(root=tmp_path)
    assert first is not None and first == system.code_fingerprint("HEAD", root=tmp_path)
    # A benchmark's, a spec's or an untracked file's change is not the system's.
    (tmp_path / "benchmarks/d.py").write_text("changed\n")
    (tmp_path / "experiments/e.yaml").write_text("e: 2\n")
    (tmp_path / "services/untracked.py").write_text("x = 1\n")
    assert system.code_fingerprint(root=tmp_path) == first
    # An uncommitted edit of each part of the system is, on disk, before any commit.
    seen = {first}
    for path in ("services/a.py", "libs/b.py", "protos/c.proto", "requirements/all.lock",
                 "pyproject.toml"):
        (tmp_path / path).write_text(files[path] + "# edited\n")
        edited = system.code_fingerprint(root=tmp_path)
        assert edited not in seen, path
        assert system.code_fingerprint("HEAD", root=tmp_path) == first
        seen.add(edited)
    _git(tmp_path, "commit", "-qam", "two")
    assert system.code_fingerprint("HEAD", root=tmp_path) == edited
    assert system.code_fingerprint("HEAD~1", root=tmp_path) == first
    assert system.code_fingerprint("no-such-commit", root=tmp_path) is None
    assert system.code_fingerprint(root=tmp_path / "benchmarks" / "not-a-checkout") is None
    # A tree without system code (a commit from before it) has no fingerprint, not the
    # digest of nothing.
    assert system.code_fingerprint("HEAD:benchmarks", root=tmp_path) is None


def test_the_code_fingerprint_on_disk_equals_the_commits_with_links_and_line_endings(tmp_path):
    # git stores a symbolic link as its target's name, and a file as its filters clean it (here
    # CRLF on disk, LF in the commit): the disk's fingerprint reads both as git does.
    (tmp_path / "services").mkdir()
    (tmp_path / "services/a.py").write_bytes(b"a = 1\n")
    os.symlink("a.py", tmp_path / "services/link.py")
    (tmp_path / ".gitattributes").write_text("*.py text eol=crlf\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    (tmp_path / "services/a.py").unlink()
    _git(tmp_path, "checkout", "--", "services/a.py")
    assert (tmp_path / "services/a.py").read_bytes() == b"a = 1\r\n"
    assert system.code_fingerprint(root=tmp_path) == system.code_fingerprint("HEAD", root=tmp_path)
    os.remove(tmp_path / "services/link.py")
    os.symlink("other.py", tmp_path / "services/link.py")
    assert system.code_fingerprint(root=tmp_path) != system.code_fingerprint("HEAD", root=tmp_path)


def test_pooling_counts_each_run_once_and_takes_one_system_code_only(tmp_path, capsys):
    entries = [
        {"measured_at": "a", "system_code": "one", "rounds": [1.02, 1.05, 0.99]},
        {"measured_at": "b", "system_code": "one", "rounds": [1.01, 1.04, 1.00]},
        {"measured_at": "c", "system_code": "one", "rounds": [1.03]},
        {"measured_at": "d", "system_code": "two", "rounds": [1.5, 1.6, 1.7]},
        {"measured_at": "e", "system_code": "two", "rounds": [1.6, 1.7, 1.8]},
        {"measured_at": "f", "system_code": None, "rounds": [1.5, 1.6, 1.7]},
    ]
    pool = system.pooled(entries, "one")
    means = [system.ratio_interval([1.02, 1.05, 0.99])[0],
             system.ratio_interval([1.01, 1.04, 1.00])[0], 1.03]
    mean, low, high = system.ratio_interval(means)  # over the runs, not the 7 rounds
    assert pool["runs"] == 3 and pool["rounds"] == 7 and pool["measured_at"] == ["a", "b", "c"]
    assert pool["run_means"] == means
    assert (pool["geometric_mean"], pool["low"], pool["high"]) == (mean, low, high)
    assert (low, high) != system.ratio_interval([1.02, 1.05, 0.99, 1.01, 1.04, 1.00, 1.03])[1:]
    assert pool["verdict"] == "yes" and pool["over_target_rounds"] == 0
    assert system.pooled(entries, "two")["verdict"] == "NO"
    assert system.pooled(entries, None) is None and system.pooled(entries, "three") is None
    # A run whose rounds are equal but for the last bit is its mean, not an error.
    near = system.pooled([{"system_code": "n", "rounds": [1.0, 1.0 + 1e-13]}], "n")
    assert abs(near["run_means"][0] - 1.0) < 1e-12 and near["verdict"] == "not decided"
    one_run = system.pooled(entries[:1], "one")
    assert one_run["low"] is None and one_run["verdict"] == "not decided"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"system_reproduction_runs": entries}))
    assert system.main(["pool", "--results", str(results), "--code", "one"]) == 0
    out = capsys.readouterr().out
    assert (f"| 3 | {means[0]:.3f}, {means[1]:.3f}, 1.030 | 7 | 0 | {mean:.3f} | "
            f"[{low:.3f}, {high:.3f}] | <= 1.10 | yes |") in out
    assert "Runs: a; b; c" in out
    system.main(["pool", "--results", str(results), "--code", "three"])
    assert "No stored run of the system code three" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    (b"\xff\xfe not utf-8", "cannot read"),
    (b"{not json", "cannot read"),
    (b"[]", "has no system_reproduction_runs"),
    (b"{}", "has no system_reproduction_runs"),
    (b'{"system_reproduction_runs": {}}', "must be a list, got dict"),
    (b'{"system_reproduction_runs": ["x"]}', r"system_reproduction_runs\[0\]: an object expected"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": null}]}',
     r"system_reproduction_runs\[0\]\.rounds: a non-empty list"),
    (b'{"system_reproduction_runs": [{}, {"system_code": "one", "rounds": [1.0, 0]}]}',
     r"system_reproduction_runs\[1\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": ["1.0"]}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": [NaN, 1.0]}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": [Infinity, 1.0]}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": [true, 1.0]}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": [1' + b"0" * 400 + b']}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": [1e308, 1.0]}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b'{"system_reproduction_runs": [{"system_code": "one", "rounds": "a\\nb"}]}',
     r"system_reproduction_runs\[0\]\.rounds"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_a_bad_results_file_is_one_line_naming_the_file_or_field(tmp_path, content, message):
    results = tmp_path / "results.json"
    if content is not None:
        results.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        system.main(["pool", "--results", str(results), "--code", "one"])
    text = str(stop.value.code)
    assert "\n" not in text and text.startswith("results: ") and str(results) in text
    assert re.search(message, text), text


def test_the_pool_commands_arguments_are_checked(capsys):
    for argv, message in ((["pool", "--code", "one", "--commit", "HEAD"], "--code and --commit"),
                          (["pool", "--code", " "], "--code: empty"),
                          (["pool", "--commit", ""], "--commit: empty"),
                          (["pool", "--commit", "no-such-commit"],
                           "'no-such-commit' is not a commit of this checkout")):
        with pytest.raises(SystemExit) as stop:
            system.main(argv)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err


def test_the_stored_runs_name_the_code_they_measured():
    # Each stored run's system_code is its commit's (the one its measured_at names; the commit
    # whose code it ran where it says "code as"); one run, whose tree was no commit, has none;
    # the section's run is the one the results' measured_at names for the system section.
    stored = json.loads((system.REPO / "benchmarks/results/cpu-1-x-cpu.json").read_text())
    runs = stored["system_reproduction_runs"]
    for run in runs:
        named = (re.search(r"code as ([0-9a-f]{7})", run["measured_at"])
                 or re.search(r"commit ([0-9a-f]{7})", run["measured_at"]))
        if run["system_code"] is None:
            assert "with 7de01d5's change" in run["measured_at"]
        else:
            assert run["system_code"] == system.code_fingerprint(named.group(1)), run["measured_at"]
    assert sum(r["system_code"] is None for r in runs) == 1
    when = stored["measured_at"]["system"].split(" (")[0]
    [shown] = [r for r in runs if r["measured_at"].split(" (")[0] == when]
    assert shown["system_code"] == stored["system"]["system_code"]
    assert shown["rounds"] == stored["system"]["ratio_cold_reproduction_rounds"]


def test_the_code_is_fingerprinted_before_the_rounds_and_checked_after_them(monkeypatch):
    events: list[str] = []
    codes = iter(["before", "after"])

    def fingerprint(*args, **kwargs):
        events.append("fingerprint")
        return next(codes)

    def study(name, result):
        def stub(*args, **kwargs):
            events.append(name)
            return result
        return stub

    monkeypatch.setattr(system, "code_fingerprint", fingerprint)
    monkeypatch.setattr(system, "_local", study("local", (10.0, 5.0)))
    monkeypatch.setattr(system, "_services", study("services", (11.0, 4.0, 6.0)))
    monkeypatch.setattr(system, "_services_cold", study("services", (11.0, {
        "runs": 1, "first_step_s": 1.0, "train_s": 5.0, "rest_of_run_s": 1.0,
        "outside_runs_s": 4.0})))
    monkeypatch.setattr(system, "_run_results", lambda folder: [])
    monkeypatch.setattr(system, "_reproduction_spec", lambda: {**system.SPEC, "name": "repro"})
    r = system.run(rounds=1, cpu_round=False)
    assert events[0] == events[-1] == "fingerprint" and events.count("fingerprint") == 2
    assert r["system_code"] is None  # it changed meanwhile
    events.clear()
    codes = iter(["same", "same"])
    assert system.run(rounds=1, cpu_round=False)["system_code"] == "same"
