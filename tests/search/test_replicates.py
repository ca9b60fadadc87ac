"""Independent search sequences per study, search replicates, evaluation in examples, readings,
margins and pre-registered comparisons in the spec."""

from __future__ import annotations

import copy

import pytest

from batchlab import limits
from batchlab.search import spec
from batchlab.search.halton import halton_point
from batchlab.search.study import TargetReading, trial_point


def _two_optimizers(base_spec, **top):
    data = copy.deepcopy(base_spec)
    adam = {"name": "adam", "config": {"optimizer": "adam",
                                       "learning_rate": {"schedule": "cosine",
                                                         "peak_value": 1e-3}},
            "search_space": {"parameters": [
                {"path": "optimizer.learning_rate.peak_value", "log": {"min": 1e-4, "max": 1e-1}},
                {"path": "optimizer.b1", "log": {"min": 1e-2, "max": 0.5}, "one_minus": True},
            ]}}
    data["optimizers"].append(adam)
    data["workloads"][0]["points"].append({"batch_size": 512, "step_budget": 50})
    data.update(top)
    return spec.expand_studies(spec.load_spec(data))


def test_studies_of_one_dimension_draw_different_points(base_spec):
    studies = _two_optimizers(base_spec)
    assert [s.search_space.dimension for s in studies] == [2, 2, 2, 2]
    points = {s.id: [trial_point(s, i) for i in range(4)] for s in studies}
    # Every pair of studies (other optimizer, other batch size, both) is tuned on other points.
    ids = list(points)
    for a in ids:
        for b in ids:
            if a != b:
                assert points[a] != points[b], (a, b)
    # The old behaviour (one experiment-wide sequence) is gone: no study uses search_seed.
    assert all(points[i][0] != halton_point(0, 2, 7) for i in ids)


def test_sharing_points_is_an_explicit_option(base_spec):
    studies = _two_optimizers(base_spec, share_search_points=True)
    first = [trial_point(studies[0], i) for i in range(4)]
    assert all([trial_point(s, i) for i in range(4)] == first for s in studies)
    # The learning rates share u, mapped into each optimizer's own range.
    u = first[2][0]
    assert studies[0].hyperparameters(2)["optimizer"]["learning_rate"]["peak_value"] == \
        pytest.approx(1e-3 * (1.0 / 1e-3) ** u)
    assert studies[2].hyperparameters(2)["optimizer"]["learning_rate"]["peak_value"] == \
        pytest.approx(1e-4 * (1e-1 / 1e-4) ** u)


def test_search_replicates_repeat_the_protocol_with_independent_luck(base_spec):
    studies = _two_optimizers(base_spec, search_replicates=3)
    assert len(studies) == 2 * 2 * 3
    ids = [s.id for s in studies]
    assert ids[:3] == ["mnist1d_resnet1d.nesterov.b128.s100.r0",
                       "mnist1d_resnet1d.nesterov.b128.s100.r1",
                       "mnist1d_resnet1d.nesterov.b128.s100.r2"]
    assert len(set(ids)) == len(ids)
    replicates = studies[:3]
    assert {s.group_id for s in replicates} == {"mnist1d_resnet1d.nesterov.b128.s100"}
    assert [s.replicate for s in replicates] == [0, 1, 2]
    # Independent searches: other points, other seeds.
    assert len({trial_point(s, 0) for s in replicates}) == 3
    assert len({s.tuning_seed(0) for s in replicates}) == 3
    # Shared points are shared within a replicate only.
    shared = _two_optimizers(base_spec, search_replicates=2, share_search_points=True)
    assert trial_point(shared[0], 1) == trial_point(shared[2], 1)  # nesterov b128/b512, r0
    assert trial_point(shared[0], 1) != trial_point(shared[1], 1)  # r0 vs r1


def test_single_replicate_ids_are_unchanged(base_spec):
    (study,) = spec.expand_studies(spec.load_spec(base_spec))
    assert study.id == study.group_id == "mnist1d_resnet1d.nesterov.b128.s100"


def test_evaluation_period_in_examples(base_spec):
    data = copy.deepcopy(base_spec)
    workload = data["workloads"][0]
    del workload["eval_every_steps"]
    workload["eval_every_examples"] = 2560
    workload["points"] = [{"batch_size": 128, "step_budget": 100},
                          {"batch_size": 512, "step_budget": 40},
                          {"batch_size": 1000, "step_budget": 30},
                          {"batch_size": 256, "step_budget": 50, "eval_every_steps": 7}]
    studies = spec.expand_studies(spec.load_spec(data))
    assert [s.eval_every_steps for s in studies] == [20, 5, 3, 7]  # ceil(2560 / 1000) = 3
    assert [s.eval_every_examples for s in studies] == [2560, 2560, 2560, 0]


@pytest.mark.parametrize("where, field", [("workload", "eval_every_examples"),
                                          ("point", "eval_every_examples")])
def test_steps_and_examples_together_are_refused(base_spec, where, field):
    data = copy.deepcopy(base_spec)
    if where == "workload":
        data["workloads"][0]["eval_every_examples"] = 1000
        path = "workloads[0].eval_every_examples"
    else:
        data["workloads"][0]["points"][0].update(eval_every_steps=5, eval_every_examples=640)
        path = "workloads[0].points[0].eval_every_examples"
    with pytest.raises(spec.SpecError, match="not both") as info:
        spec.load_spec(data)
    assert info.value.field_path == path


def test_target_reading_and_margins(base_spec):
    data = copy.deepcopy(base_spec)
    data["workloads"][0]["target"].update(reading="END_OF_BUDGET", equivalence_margin=0.005,
                                          fraction_margin=0.3)
    (study,) = spec.expand_studies(spec.load_spec(data))
    assert study.target.reading is TargetReading.END_OF_BUDGET
    assert (study.target.metric_margin, study.target.reaching_margin) == (0.005, 0.3)
    (default,) = spec.expand_studies(spec.load_spec(base_spec))
    assert default.target.reading is TargetReading.FIRST_EVALUATION
    assert default.target.metric_margin == pytest.approx(0.008)  # 1% of the 0.8 target


@pytest.mark.parametrize("field, value, message", [
    ("equivalence_margin", 0.0, "finite number > 0"),
    ("equivalence_margin", -1.0, "finite number > 0"),
    ("fraction_margin", 1.0, "in \\(0, 1\\)"),
    ("reading", "SOMETIMES", "must be one of"),
])
def test_bad_target_settings_name_the_field(base_spec, field, value, message):
    data = copy.deepcopy(base_spec)
    data["workloads"][0]["target"][field] = value
    with pytest.raises(spec.SpecError, match=message) as info:
        spec.load_spec(data)
    assert info.value.field_path == f"workloads[0].target.{field}"


def test_unknown_enum_numbers_from_the_wire_are_refused(base_spec):
    message = spec.load_spec(base_spec)
    message.workloads[0].target.reading = 7  # proto3 keeps unknown enum numbers
    with pytest.raises(spec.SpecError, match="reading") as info:
        spec.validate_spec(message)
    assert info.value.field_path == "workloads[0].target.reading"


def test_comparisons_must_name_labels_of_the_spec(base_spec):
    data = copy.deepcopy(base_spec)
    data["comparisons"] = [{"a": "nesterov", "b": "lars"}]
    with pytest.raises(spec.SpecError, match="optimizer label") as info:
        spec.load_spec(data)
    assert info.value.field_path == "comparisons[0].b"
    data["comparisons"] = [{"a": "nesterov", "b": "nesterov"}]
    with pytest.raises(spec.SpecError, match="itself"):
        spec.load_spec(data)


def test_search_replicates_have_a_maximum(base_spec):
    data = copy.deepcopy(base_spec)
    data["search_replicates"] = limits.MAX_SEARCH_REPLICATES + 1
    with pytest.raises(spec.SpecError, match="search_replicates"):
        spec.load_spec(data)
