"""The system benchmark's report: its per-round ratios are the ones its medians are taken of."""

from __future__ import annotations

import re

import numpy as np

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
