"""The load benchmark of `make bench` (benchmarks/load.py): its figures, and its quick variant
end to end against the real embedded stack."""

from __future__ import annotations

import math

import pytest

from benchmarks import load


def test_summary_counts_errors_and_takes_percentiles_of_answered_calls():
    records = [("GetExperiment", "OK", t / 1000) for t in range(1, 101)]
    records += [("ListTrials", "OK", 0.5), ("ListTrials", "UNAVAILABLE", 9.0),
                ("GetShard", "DEADLINE_EXCEEDED", 30.0)]
    summary = load.summarize(records, seconds=10.0)
    assert (summary["calls"], summary["errors"]) == (103, 2)
    assert summary["errors_by_code"] == {"UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1}
    assert summary["calls_per_s"] == 10.3
    get = summary["methods"]["GetExperiment"]
    assert (get["calls"], get["errors"]) == (100, 0)
    assert get["p50_ms"] == pytest.approx(50.5) and get["p99_ms"] == pytest.approx(99.01)
    assert summary["methods"]["ListTrials"]["p99_ms"] == 500.0  # the failed call is left out
    assert math.isnan(summary["methods"]["GetShard"]["p50_ms"])
    assert "| GetExperiment | 100 | 0 | 50.5 | 99.0 |" in load.to_markdown(
        {**summary, "clients": 2, "seconds": 10.0, "watches": 1})


@pytest.mark.slow
def test_the_quick_load_run_calls_every_method_without_errors():
    result = load.run(quick=True)
    assert result["clients"] == load.QUICK["clients"]
    assert result["calls"] > 50
    assert result["errors"] == 0, result["errors_by_code"]
    for method, figures in result["methods"].items():
        assert figures["calls"] > 0, method
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert result["watch_messages"] >= 1
