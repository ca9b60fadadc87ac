"""The parallel-trials benchmark's count of runs in flight, from stored results."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.parallel_trials import _in_flight


def _run(folder, name, start, end):
    path = folder / "runs" / "study" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result": {"wall_time_s": end - start}}))
    os.utime(path, (end, end))


def test_seconds_by_runs_in_flight(tmp_path):
    # 0-1 none, 1-3 one, 3-5 two, 5-6 one (the seed rerun waits for its trials), 6-8 one, 8-10 none.
    _run(tmp_path, "a", 1000001.0, 1000005.0)
    _run(tmp_path, "b", 1000003.0, 1000006.0)
    _run(tmp_path, "c", 1000006.0, 1000008.0)
    seconds = _in_flight(tmp_path, 1000000.0, 1000010.0)
    assert seconds == pytest.approx({0: 3.0, 1: 5.0, 2: 2.0})
    assert sum(seconds.values()) == pytest.approx(10.0)
