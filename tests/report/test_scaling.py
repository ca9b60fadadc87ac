"""The batch-size scaling table: efficiency and its resolution range, and the table's rows."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from synthetic_results import EVAL_EVERY, SEEDS, Synthetic, _curve, first_step_reaching

from batchlab.report.results import load_results
from batchlab.report.tables import _scaling_reading, scaling_efficiency, scaling_table

BUDGETS = {128: 100, 512: 50}


def test_perfect_scaling_is_one_and_its_range_follows_the_evaluation_period():
    # Batch 64 -> 128, 800 -> 400 steps, evaluated every 128 and 64 steps.
    value, low, high = scaling_efficiency((64, 800.0, 128), (128, 400.0, 64))
    assert value == 1.0
    assert low == pytest.approx((800 - 128) / 400 / 2)
    assert high == pytest.approx(800 / (400 - 64) / 2)


def test_the_same_steps_at_twice_the_batch_is_the_no_gain_level():
    assert scaling_efficiency((256, 100.0, 10), (512, 100.0, 10))[0] == 0.5
    assert scaling_efficiency((256, 100.0, 10), (1024, 25.0, 40))[0] == 1.0
    # A median within one period of step 0 bounds nothing from above.
    assert math.isinf(scaling_efficiency((256, 100.0, 10), (512, 8.0, 8))[2])


@pytest.mark.parametrize("smaller, larger, field", [
    ((128, 100.0, 10), (128, 50.0, 10), "batch sizes must increase"),
    ((128, math.inf, 10), (256, 50.0, 10), "smaller"),
    ((128, 100.0, 10), (256, 0.0, 10), "larger"),
])
def test_bad_figures_are_refused_naming_which(smaller, larger, field):
    with pytest.raises(ValueError, match=field):
        scaling_efficiency(smaller, larger)


def _row(table: str, label: str, batch: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [label, batch]:
            return cells
    raise AssertionError(f"no row {label} {batch} in\n{table}")


def _median_steps(key: str, budget: int) -> float:
    steps = [math.inf if v is None else (first_step_reaching(_curve(*v, budget, 1.0)) or math.inf)
             for v in SEEDS[key]]
    return float(np.median(steps))


def test_the_table_computes_speed_up_and_efficiency_from_the_seeds(synthetic: Synthetic):
    table = scaling_table(load_results(synthetic.root), "mnist1d_resnet1d")
    m128 = _median_steps("lars_pipeline.b128", BUDGETS[128])
    m512 = _median_steps("lars_pipeline.b512", BUDGETS[512])
    assert math.isfinite(m128) and math.isfinite(m512)
    small, large = _row(table, "lars_pipeline", "128"), _row(table, "lars_pipeline", "512")
    assert small[3] == f"{round(m128):,} ({EVAL_EVERY})" and small[7:9] == ["—", "—"]
    assert large[3] == f"{round(m512):,} ({EVAL_EVERY})"
    assert large[4] == "3 / 5"  # one seed below the target, one diverged
    assert large[6] == f"{round(m512 * 512):,}"
    # By hand: the target was first met in (s - period, s] at each batch size.
    low, high = (m128 - EVAL_EVERY) / m512, m128 / (m512 - EVAL_EVERY)
    assert large[7] == f"{m128 / m512:.2f}x [{low:.2f}, {high:.2f}] (4x)"
    assert large[8] == f"{m128 / m512 / 4:.2f} [{low / 4:.2f}, {high / 4:.2f}]"
    expected = ("undetermined" if high / 4 > 1 and low / 4 < 0.25 else
                "consistent with perfect scaling" if high / 4 > 1 else
                "consistent with no gain" if low / 4 < 0.25 else "diminishing returns")
    assert large[9] == expected
    # Nesterov never reaches the target at batch 512: no speed-up, no efficiency.
    never = _row(table, "nesterov", "512")
    assert never[3] == f"never ({EVAL_EVERY})" and never[4] == "0 / 5" and never[7:] == ["—"] * 3


@pytest.mark.parametrize("low, high, ratio, reading", [
    # Perfect scaling possible only above 1 (the ranges are open): a top of exactly 1 is not.
    (0.8, 1.2, 2, "consistent with perfect scaling"), (0.6, 1.0, 2, "diminishing returns"),
    (0.6, 0.9, 2, "diminishing returns"),
    # No gain (efficiency 1/2 at twice the batch) possible only below 1/2.
    (0.45, 0.9, 2, "consistent with no gain"), (0.5, 0.9, 2, "diminishing returns"),
    (0.4, 2.0, 2, "undetermined"), (1.1, 1.3, 2, "better than perfect")])
def test_each_reading_on_a_constructed_range(low, high, ratio, reading):
    assert _scaling_reading(low, high, ratio) == reading


def test_a_never_in_between_gives_no_figures_across_it(tmp_path):
    """Batch 128 reaches the target, 512 never, 2,048 again: 2,048 gets a speed-up over 128
    but no efficiency (its previous point is the never)."""
    from synthetic_results import SPEC, build_results

    spec = copy.deepcopy(SPEC)
    spec["workloads"][0]["points"].append({"batch_size": 2048, "step_budget": 50})
    synthetic = build_results(tmp_path / "r", spec=spec,
                              seeds={"nesterov.b2048": SEEDS["lars_pipeline.b128"]})
    table = scaling_table(load_results(synthetic.root), "mnist1d_resnet1d")
    assert _row(table, "nesterov", "512")[3].startswith("never")
    last = _row(table, "nesterov", "2,048")
    assert last[7].endswith("(16x)") and last[8:] == ["—", "—"]
