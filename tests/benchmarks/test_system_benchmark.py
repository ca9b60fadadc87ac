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
    r["reproduction_cpu_sample_interval_s"] = [0.5, 2.0]
    assert "sampled every 0.5 and 2 s, so lower bounds" in system.to_markdown(r)
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
