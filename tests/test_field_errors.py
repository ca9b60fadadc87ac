"""One validation error family: every validator's error is a FieldError naming the field."""

from __future__ import annotations

import json

import pytest

from batchlab.errors import FieldError
from batchlab.optim import from_config
from batchlab.report import load_results
from batchlab.search.spec import load_spec
from batchlab.train.workloads import get_workload


def _spec_with_bad_seed():
    from batchlab.search.spec import read_yaml

    spec = read_yaml("experiments/examples/minimal.yaml")
    spec["search_seed"] = "seven"
    return spec


@pytest.mark.parametrize("make_error, field", [
    (lambda: from_config({"optimizer": "nesterov", "learning_rate": 0.1, "momentum": 1.5}),
     "optimizer.momentum"),
    (lambda: get_workload("mnist1d_resnet1d").hyperparameters({"bn_momentum": "x"}),
     "workload.bn_momentum"),
    (lambda: load_spec(_spec_with_bad_seed()), "search_seed"),
], ids=["optimizer config", "workload hyperparameter", "experiment spec"])
def test_every_validator_raises_a_field_error_naming_the_field(make_error, field):
    with pytest.raises(FieldError) as caught:
        make_error()
    assert caught.value.field_path == field
    assert str(caught.value).startswith(f"{field}: ") and caught.value.reason


def test_a_bad_results_file_is_a_field_error_naming_the_file_and_field(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps({"name": 3}))
    with pytest.raises(FieldError) as caught:
        load_results(tmp_path)
    assert caught.value.field_path == "name"
    assert str(caught.value).startswith(f"{tmp_path / 'experiment.json'}: name: ")
