"""Search spaces: parsing, validation errors that name the field, value mapping, paths."""

from __future__ import annotations

import math

import pytest

from batchlab.paths import set_path
from batchlab.search.space import (
    Scale,
    SearchSpace,
    SpecError,
    parse_search_space,
)


def _space(*parameters):
    return {"parameters": list(parameters)}


LR = {"path": "optimizer.learning_rate", "log": {"min": 1e-3, "max": 1.0}}


@pytest.mark.parametrize("space, field_path, words", [
    (_space({"path": "optimizer.lr", "log": {"min": -1, "max": 1}}),
     "search_space.parameters[0].log.min", "must be > 0 for a log scale, got -1"),
    (_space({"path": "optimizer.lr", "log": {"min": 0, "max": 1}}),
     "search_space.parameters[0].log.min", "> 0"),
    (_space({"path": "optimizer.lr", "linear": {"min": 2, "max": 1}}),
     "search_space.parameters[0].linear.max", "must be > min"),
    (_space({"path": "optimizer.lr", "linear": {"min": 1, "max": 1}}),
     "search_space.parameters[0].linear.max", "must be > min"),
    (_space({"path": "optimizer.lr", "linear": {"min": 1}}),
     "search_space.parameters[0].linear.max", "required"),
    (_space({"path": "optimizer.lr", "linear": {"min": 0, "max": math.inf}}),
     "search_space.parameters[0].linear.max", "finite"),
    (_space({"path": "optimizer.lr", "discrete": {"values": []}}),
     "search_space.parameters[0].discrete.values", "non-empty"),
    (_space({"path": "optimizer.lr", "discrete": {"values": [1, 2, 1]}}),
     "search_space.parameters[0].discrete.values[2]", "duplicate"),
    (_space({"path": "optimizer.lr", "discrete": {"values": [1, [2]]}}),
     "search_space.parameters[0].discrete.values[1]", "a string or a bool"),
    (_space({"path": "optimizer.lr", "fixed": {}}),
     "search_space.parameters[0].fixed.value", "required"),
    (_space({"path": "optimizer.lr"}),
     "search_space.parameters[0]", "exactly one of linear, log, discrete, fixed"),
    (_space({"path": "optimizer.lr", "log": {"min": 1, "max": 2}, "linear": {"min": 1, "max": 2}}),
     "search_space.parameters[0].log", "only one of"),
    (_space({"path": "lr", "log": {"min": 1, "max": 2}}),
     "search_space.parameters[0].path", "starting with 'optimizer.' or 'workload.'"),
    (_space({"path": "optimizer..lr", "log": {"min": 1, "max": 2}}),
     "search_space.parameters[0].path", "dotted path"),
    (_space({"path": "optimizer.weights.learning-rate", "log": {"min": 1, "max": 2}}),
     "search_space.parameters[0].path", "dotted path"),
    (_space(LR, {"path": "workload.x", "log": {"min": 1, "max": 2}, "tied_paths": ["x"]}),
     "search_space.parameters[1].tied_paths[0]", "dotted path"),
    (_space(LR, dict(LR)),
     "search_space.parameters[1].path", "already set by parameters[0]"),
    (_space(LR, {"path": "optimizer.learning_rate.peak_value", "fixed": {"value": 1}}),
     "search_space.parameters[1].path", "overlaps"),
    (_space({"path": "optimizer.lr", "log": {"min": 1, "max": 2}, "scale": "log"}),
     "search_space.parameters[0].scale", "unknown field"),
    (_space({"path": "optimizer.lr", "discrete": {"values": ["a"]}, "one_minus": True}),
     "search_space.parameters[0].one_minus", "numeric"),
    (_space({"path": "optimizer.lr", "discrete": {"values": [1]}, "integer": True}),
     "search_space.parameters[0].integer", "linear and log"),
    (_space({"path": "optimizer.lr", "linear": {"min": 0.2, "max": 0.8}, "integer": True}),
     "search_space.parameters[0].linear", "no integer"),
    (_space({"path": "optimizer.lr", "log": {"min": 1, "max": 2}, "one_minus": "yes"}),
     "search_space.parameters[0].one_minus", "true or false"),
    ({"parameters": {"path": "optimizer.lr"}}, "search_space.parameters", "must be a list"),
])
def test_invalid_spaces_name_the_field(space, field_path, words):
    with pytest.raises(SpecError) as caught:
        parse_search_space(space)
    assert caught.value.field_path == field_path
    assert words in caught.value.message
    assert str(caught.value).startswith(f"{field_path}: ")


def test_field_path_prefix_and_all_problems_reported():
    space = _space({"path": "optimizer.a", "log": {"min": -1, "max": 1}},
                   {"path": "bad", "linear": {"min": 0, "max": 1}})
    with pytest.raises(SpecError) as caught:
        parse_search_space(space, field_path="optimizers[1].search_space")
    assert caught.value.field_path == "optimizers[1].search_space.parameters[0].log.min"
    assert str(caught.value).splitlines()[0] == (
        "optimizers[1].search_space.parameters[0].log.min: must be > 0 for a log scale, got -1")
    assert [p for p, _ in caught.value.problems] == [
        "optimizers[1].search_space.parameters[0].log.min",
        "optimizers[1].search_space.parameters[1].path"]
    assert isinstance(caught.value, ValueError)


def test_empty_space_has_no_dimensions():
    assert parse_search_space(None) == SearchSpace()
    assert parse_search_space({}).dimension == 0
    assert SearchSpace().assign([]) == {}


def test_fixed_parameters_take_no_dimension_and_order_is_kept():
    space = parse_search_space(_space(
        {"path": "optimizer.a", "fixed": {"value": 0.929}},
        {"path": "optimizer.b", "linear": {"min": 0, "max": 10}},
        {"path": "optimizer.c", "discrete": {"values": ["x", "y"]}},
    ))
    assert space.dimension == 2
    assert [p.scale for p in space.parameters] == [Scale.FIXED, Scale.LINEAR, Scale.DISCRETE]
    assert space.assign([0.5, 0.75]) == {"optimizer.a": 0.929, "optimizer.b": 5.0,
                                         "optimizer.c": "y"}


@pytest.mark.parametrize("parameter, u, expected", [
    ({"log": {"min": 1e-3, "max": 1.0}, "one_minus": True}, 0.0, 1 - 1e-3),  # 1 - momentum
    ({"log": {"min": 1e-4, "max": 1e-2}, "one_minus": True}, 0.5, 1 - 1e-3),
    ({"fixed": {"value": 0.02397}, "one_minus": True}, None, 1 - 0.02397),
    ({"discrete": {"values": [0.1, 0.01]}, "one_minus": True}, 0.9, 0.99),
    ({"linear": {"min": 300, "max": 800}, "integer": True}, 0.0, 300),
    ({"linear": {"min": 300, "max": 800}, "integer": True}, 0.999999, 800),
    ({"linear": {"min": 300, "max": 800}, "integer": True}, 0.5, 550),
    ({"log": {"min": 100, "max": 10000}, "integer": True}, 0.5, 1000),
    ({"discrete": {"values": [1.0, 2.0]}}, 0.7, 2),  # integral floats from JSON come back int
])
def test_value_mapping(parameter, u, expected):
    (p,) = parse_search_space(_space({"path": "optimizer.x", **parameter})).parameters
    value = p.value_at(u)
    assert value == pytest.approx(expected, rel=1e-12)
    assert type(value) is type(expected)


def test_integer_linear_is_uniform_over_the_integers():
    (p,) = parse_search_space(_space(
        {"path": "optimizer.x", "linear": {"min": 1, "max": 3}, "integer": True})).parameters
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(300):
        counts[p.value_at((i + 0.5) / 300)] += 1
    assert counts == {1: 100, 2: 100, 3: 100}


def test_tied_paths_receive_the_same_value():
    space = parse_search_space(_space({
        "path": "optimizer.weights.learning_rate.warmup_power",
        "tied_paths": ["optimizer.weights.learning_rate.decay_power"],
        "discrete": {"values": [1, 2]},
    }))
    assert space.assign([0.6]) == {"optimizer.weights.learning_rate.warmup_power": 2,
                                   "optimizer.weights.learning_rate.decay_power": 2}


def test_u_outside_the_unit_interval_is_rejected():
    (p,) = parse_search_space(_space(LR)).parameters
    for u in (-0.1, 1.0, None):
        with pytest.raises(ValueError):
            p.value_at(u)


def test_round_trip_through_to_dict():
    data = _space(
        LR,
        {"path": "workload.label_smoothing", "linear": {"min": 0.0, "max": 0.2}},
        {"path": "optimizer.momentum", "log": {"min": 0.001, "max": 1.0}, "one_minus": True},
        {"path": "optimizer.p", "discrete": {"values": [1, 2]}, "tied_paths": ["optimizer.q"]},
        {"path": "workload.gamma_0", "fixed": {"value": 0.4138}},
        {"path": "optimizer.warmup", "linear": {"min": 300, "max": 800}, "integer": True},
    )
    space = parse_search_space(data)
    assert parse_search_space(space.to_dict()) == space


def test_set_path_creates_missing_keys():
    mapping = {"optimizer": {"weights": {"learning_rate": {"schedule": "cosine"}}}}
    set_path(mapping, "optimizer.weights.learning_rate.peak_value", 2.0)
    set_path(mapping, "workload.label_smoothing", 0.1)
    assert mapping == {"optimizer": {"weights": {"learning_rate": {"schedule": "cosine",
                                                                   "peak_value": 2.0}}},
                       "workload": {"label_smoothing": 0.1}}


def test_set_path_through_a_number_fails_clearly():
    mapping = {"optimizer": {"learning_rate": 0.1}}
    with pytest.raises(ValueError, match="'optimizer.learning_rate' holds 0.1, not a mapping"):
        set_path(mapping, "optimizer.learning_rate.peak_value", 1.0)
