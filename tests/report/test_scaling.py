"""The batch-size scaling table: efficiency and its resolution range, and the table's rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic_results import EVAL_EVERY, SEEDS, Synthetic, _curve, first_step_reaching

from batchlab.report.results import load_results
from batchlab.report.tables import scaling_efficiency, scaling_table

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
    assert large[7] == f"{m128 / m512:.2f}x (4x)"
    value, low, high = scaling_efficiency((128, m128, EVAL_EVERY), (512, m512, EVAL_EVERY))
    assert large[8] == f"{value:.2f} [{low:.2f}, {high:.2f}]"
    assert large[9] in {"perfect scaling", "diminishing returns", "better than perfect"}
    # Nesterov never reaches the target at batch 512: no speed-up, no efficiency.
    never = _row(table, "nesterov", "512")
    assert never[3] == f"never ({EVAL_EVERY})" and never[4] == "0 / 5" and never[7:] == ["—"] * 3


@pytest.mark.parametrize("low, high, ratio, reading", [
    (0.8, 1.2, 2, "perfect scaling"), (0.6, 0.9, 2, "diminishing returns"),
    (0.3, 0.5, 2, "no gain (maximal data parallelism)"), (1.1, 1.3, 2, "better than perfect")])
def test_each_reading_on_a_constructed_range(low, high, ratio, reading):
    from batchlab.report.tables import _scaling_reading
    assert _scaling_reading(low, high, ratio) == reading
