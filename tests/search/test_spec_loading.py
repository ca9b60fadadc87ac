"""Experiment specs: YAML -> ExperimentSpec, errors that name the field, studies and trials."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchlab.proto.v1 import common_pb2, experiment_pb2
from batchlab.search import halton, protocol, spec, study
from batchlab.search.space import SpecError

REPO_ROOT = Path(__file__).resolve().parents[2]
MINIMAL_SPEC = REPO_ROOT / "experiments" / "examples" / "minimal.yaml"
KNOWN = {"mnist1d_resnet1d", "digits_resnet20", "mlm_tiny_bert", "imagenet_resnet50",
         "bert_large_phase1"}


def test_minimal_example_loads_and_expands():
    loaded = spec.load_spec(MINIMAL_SPEC, known_workloads=KNOWN)
    assert isinstance(loaded, experiment_pb2.ExperimentSpec)
    studies = spec.expand_studies(loaded)
    assert [s.id for s in studies] == [
        "mnist1d_resnet1d.nesterov.b128.s200",
        "mnist1d_resnet1d.nesterov.b512.s100",
        "mnist1d_resnet1d.lars_pipeline.b128.s200",
        "mnist1d_resnet1d.lars_pipeline.b512.s100",
    ]
    assert [s.index for s in studies] == [0, 1, 2, 3]
    assert [s.eval_every_steps for s in studies] == [20, 10, 20, 10]
    first = studies[0]
    assert first.target == study.Target("validation/accuracy", 0.6, study.Goal.MAXIMIZE)
    assert (first.trials_per_study, first.max_total_trials, first.seeds_per_best) == (4, 8, 2)
    assert first.selection is study.Selection.BEST_VALIDATION_METRIC
    assert first.max_attempts == 2 and first.resources == {"cpus": 1.0}


def test_yaml_scientific_notation_is_a_float():
    data = spec.read_yaml(MINIMAL_SPEC)
    assert data["optimizers"][1]["config"]["weights"]["weight_decay"] == 1e-4
    (study_,) = [s for s in spec.expand_studies(spec.load_spec(data))
                 if s.id.endswith("lars_pipeline.b128.s200")]
    assert study_.optimizer_config["weights"]["weight_decay"] == 1e-4


def test_trial_hyperparameters_write_the_halton_point():
    studies = spec.expand_studies(spec.load_spec(MINIMAL_SPEC))
    nesterov = studies[0]
    u = halton.halton_point(5, 3, seed=nesterov.halton_seed)
    hp = spec.trial_hyperparameters(nesterov, 5)
    assert hp["optimizer"]["learning_rate"]["peak_value"] == pytest.approx(
        1e-2 * (3.0 / 1e-2) ** u[0])
    assert hp["optimizer"]["momentum"] == pytest.approx(1 - 1e-2 * (0.3 / 1e-2) ** u[1])
    assert hp["workload"]["label_smoothing"] == pytest.approx(0.2 * u[2])
    # total_steps left out of the schedule is the study's step budget.
    assert hp["optimizer"]["learning_rate"]["total_steps"] == 200
    assert spec.trial_hyperparameters(studies[1], 5)["optimizer"]["learning_rate"][
        "total_steps"] == 100
    # Same trial, same values; the study's base config is not modified.
    assert spec.trial_hyperparameters(nesterov, 5) == hp
    assert "total_steps" not in nesterov.optimizer_config["learning_rate"]


def test_tied_and_fixed_parameters_in_a_per_group_config():
    lars = spec.expand_studies(spec.load_spec(MINIMAL_SPEC))[2]
    for trial in range(6):
        hp = lars.hyperparameters(trial)["optimizer"]
        assert hp["weights"]["learning_rate"]["peak_value"] == \
            hp["bias_bn"]["learning_rate"]["peak_value"]
        assert hp["weights"]["learning_rate"]["warmup_power"] in (1, 2)
        assert hp["weights"]["momentum"] == 0.929 and hp["bias_bn"]["momentum"] == 0.9


def test_every_trial_config_passes_the_optimizer_schema():
    from batchlab.optim.schema import validate_optimizer_config

    for study_ in spec.expand_studies(spec.load_spec(MINIMAL_SPEC)):
        for trial in range(10):
            validate_optimizer_config(study_.hyperparameters(trial)["optimizer"])


def test_schedules_filled_with_total_steps_match_the_schema():
    from batchlab.optim.schema import SCHEDULES

    assert study.SCHEDULES_WITH_TOTAL_STEPS == {
        name for name, fields in SCHEDULES.items() if "total_steps" in fields}


def test_seeds_are_distinct_and_stable():
    a = spec.expand_studies(spec.load_spec(MINIMAL_SPEC))[0]
    b = spec.expand_studies(spec.load_spec(MINIMAL_SPEC))[0]
    seeds = study.run_seeds(a, 3)
    assert seeds == study.run_seeds(b, 3) and len(set(seeds)) == 1 + a.seeds_per_best
    assert all(0 <= s < study.SEED_LIMIT for s in seeds)
    assert a.tuning_seed(3) != a.tuning_seed(4)
    other = spec.expand_studies(spec.load_spec(MINIMAL_SPEC))[1]
    assert a.tuning_seed(3) != other.tuning_seed(3)


def _mutate(base, path, value):
    data = copy.deepcopy(base)
    node = data
    keys = path.split("/")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_DELETE = object()
_OPT = "optimizers/0"
_PARAM = "optimizers/0/search_space/parameters/0"
_POINT = "workloads/0/points/0"


@pytest.mark.parametrize("path, value, field_path, words", [
    ("trials_per_sudy", 3, "trials_per_sudy", "did you mean 'trials_per_study'?"),
    (f"{_POINT}/batch", 3, "workloads[0].points[0].batch", "did you mean 'batch_size'?"),
    (f"{_OPT}/search_space/parameters/0/scale", "log",
     "optimizers[0].search_space.parameters[0].scale", "unknown field"),
    ("selection", "BEST_METRIC", "selection", "BEST_VALIDATION_METRIC"),
    ("workloads/0/target/goal", "MAX", "workloads[0].target.goal", "MAXIMIZE"),
    (f"{_POINT}/batch_size", -5, "workloads[0].points[0].batch_size",
     "must be a non-negative integer, got -5"),
    (f"{_POINT}/batch_size", 0, "workloads[0].points[0].batch_size", "must be > 0"),
    (f"{_POINT}/batch_size", "128", "workloads[0].points[0].batch_size", "integer"),
    (f"{_POINT}/step_budget", 2.5, "workloads[0].points[0].step_budget", "integer"),
    ("optimizers", [], "optimizers", "at least one optimizer"),
    ("workloads", [], "workloads", "at least one workload"),
    ("workloads/0/points", [], "workloads[0].points", "at least one"),
    (f"{_PARAM}/path", "learning_rate.peak_value",
     "optimizers[0].search_space.parameters[0].path", "starting with 'optimizer.'"),
    (f"{_PARAM}/log/min", -1, "optimizers[0].search_space.parameters[0].log.min",
     "must be > 0 for a log scale, got -1"),
    (f"{_PARAM}/linear", {"min": 0, "max": 1}, "optimizers[0].search_space.parameters[0].linear",
     "only one of"),
    ("workloads/0/workload", "mnist1d_resnet", "workloads[0].workload",
     "did you mean 'mnist1d_resnet1d'?"),
    ("workloads/0/workload", "MNIST", "workloads[0].workload", "registered workload name"),
    ("workloads/0/target/value", _DELETE, "workloads[0].target.value", "required"),
    ("workloads/0/target/value", None, "workloads[0].target.value", "must not be null"),
    ("workloads/0/target", _DELETE, "workloads[0].target", "required"),
    ("workloads/0/target/goal", _DELETE, "workloads[0].target.goal", "required"),
    ("max_total_trials", 3, "max_total_trials", ">= trials_per_study (4)"),
    ("max_total_trials", _DELETE, "max_total_trials", "required"),
    ("trials_per_study", 0, "trials_per_study", ">= 1"),
    ("selection", _DELETE, "selection", "required"),
    ("name", "My Experiment", "name", "lower-case"),
    ("workloads/0/eval_every_steps", 500, "workloads[0].points[0].step_budget",
     "exceeds step_budget"),
    ("workloads/0/eval_every_steps", _DELETE, "workloads[0].points[0].eval_every_steps",
     "required"),
    ("workloads/0/hyperparameters", [1], "workloads[0].hyperparameters", "must be a mapping"),
    (f"{_OPT}/name", "Nesterov (eps)", "optimizers[0].name", "lower-case"),
    (f"{_OPT}/config", _DELETE, "optimizers[0].config", "required"),
    (f"{_OPT}/config/optimizer", "adamw", "optimizers[0].config.optimizer", "unknown optimizer"),
    (f"{_OPT}/config/learning_rate/schedule", "cosin",
     "optimizers[0].config.learning_rate.schedule", "unknown schedule"),
    ("resources", {"cpus": -1}, "resources.cpus", ">= 0"),
    ("resources", {"gpu": 1}, "resources.gpu", "did you mean 'gpus'?"),
    # gpus and tpus count the whole run, split evenly over its hosts.
    ("resources", {"tpus": 10, "num_hosts": 4}, "resources.tpus",
     "multiple of resources.num_hosts (4)"),
    ("resources", {"gpus": 1, "num_hosts": 2}, "resources.gpus",
     "multiple of resources.num_hosts (2)"),
])
def test_bad_specs_name_the_field(base_spec, path, value, field_path, words):
    with pytest.raises(SpecError) as caught:
        spec.load_spec(_mutate(base_spec, path, value), known_workloads=KNOWN)
    assert caught.value.field_path == field_path, str(caught.value)
    assert words in caught.value.message, str(caught.value)


def test_a_search_parameter_may_supply_a_config_field(base_spec):
    # momentum is left out of the config: the search space writes it into every trial.
    data = _mutate(base_spec, "optimizers/0/config/momentum", _DELETE)
    (study_,) = spec.expand_studies(spec.load_spec(data))
    assert 0.5 <= study_.hyperparameters(0)["optimizer"]["momentum"] < 1


def test_search_range_outside_the_schema_is_reported_at_the_parameter(base_spec):
    # 1 - momentum up to 2 gives a negative momentum at the high corner of the space.
    data = _mutate(base_spec, "optimizers/0/search_space/parameters/1/log/max", 2.0)
    with pytest.raises(SpecError) as caught:
        spec.load_spec(data)
    assert caught.value.field_path == "optimizers[0].search_space.parameters[1]"
    assert "optimizers[0].config.momentum" in caught.value.message
    assert "high corner" in caught.value.message


def test_warmup_longer_than_a_points_budget_is_reported(base_spec):
    data = _mutate(base_spec, "optimizers/0/config/learning_rate/warmup_steps", 150)
    with pytest.raises(SpecError) as caught:
        spec.load_spec(data)
    assert caught.value.field_path == "optimizers[0].config.learning_rate.warmup_steps"
    assert "workloads[0].points[0]" in caught.value.message


def test_path_through_a_number_is_reported_at_the_parameter(base_spec):
    data = _mutate(base_spec, "optimizers/0/search_space/parameters/0/path",
                   "optimizer.momentum.value")
    with pytest.raises(SpecError) as caught:
        spec.load_spec(data)
    assert caught.value.field_path in (
        "optimizers[0].search_space.parameters[0].path",
        "optimizers[0].search_space.parameters[1].path")  # the two paths also overlap
    assert "not a mapping" in str(caught.value) or "overlaps" in str(caught.value)


def test_all_problems_are_reported_together(base_spec):
    data = _mutate(base_spec, "workloads/0/points/0/batch_size", 0)
    data = _mutate(data, "optimizers/0/search_space/parameters/0/log/min", -1)
    data = _mutate(data, "trials_per_study", 0)
    with pytest.raises(SpecError) as caught:
        spec.load_spec(data)
    paths = [p for p, _ in caught.value.problems]
    assert "workloads[0].points[0].batch_size" in paths
    assert "optimizers[0].search_space.parameters[0].log.min" in paths
    assert "trials_per_study" in paths
    assert len(str(caught.value).splitlines()) == len(paths)


def test_duplicates_are_errors(base_spec):
    data = copy.deepcopy(base_spec)
    data["optimizers"].append(copy.deepcopy(data["optimizers"][0]))
    data["workloads"][0]["points"].append({"batch_size": 128, "step_budget": 100})
    with pytest.raises(SpecError) as caught:
        spec.load_spec(data)
    assert dict(caught.value.problems) == {
        "workloads[0].points[1]": "same batch_size and step_budget as points[0]",
        "optimizers[1].name": "'nesterov' is already optimizers[0]",
    }


@pytest.mark.parametrize("text, words", [
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_files(tmp_path, text, words):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=words):
        spec.load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        spec.load_spec(tmp_path / "absent.yaml")


def test_struct_values_must_be_json(tmp_path):
    text = textwrap.dedent("""\
        workloads:
          - workload: mnist1d_resnet1d
            hyperparameters: {started: 2021-01-01}
        """)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        spec.load_spec(path)
    assert caught.value.field_path == "workloads[0].hyperparameters.started"


def test_camel_case_json_names_are_accepted_as_in_the_json_mapping(base_spec):
    data = copy.deepcopy(base_spec)
    data["trialsPerStudy"] = data.pop("trials_per_study")
    assert spec.load_spec(data).trials_per_study == 4


def test_validate_a_message_and_round_trip(base_spec):
    loaded = spec.load_spec(base_spec)
    assert spec.load_spec(spec.spec_to_dict(loaded)) == loaded
    message = experiment_pb2.ExperimentSpec()
    message.CopyFrom(loaded)
    message.workloads[0].points[0].batch_size = 0
    with pytest.raises(SpecError, match=r"workloads\[0\]\.points\[0\]\.batch_size"):
        spec.validate_spec(message)


def test_study_ids_split_back():
    assert spec.study_id("imagenet_resnet50", "lars_pipeline", 32768, 2512) == \
        "imagenet_resnet50.lars_pipeline.b32768.s2512"


def test_python_enums_match_the_proto_enums():
    for enum_cls, proto_enum in ((protocol.Outcome, common_pb2.Outcome),
                                 (study.Goal, common_pb2.Goal),
                                 (study.Selection, experiment_pb2.Selection)):
        proto_values = {n: v for n, v in proto_enum.items() if v != 0}
        assert {m.name: m.value for m in enum_cls} == proto_values


def test_search_package_imports_no_jax():
    # The controller installs no JAX and drives studies with this package.
    code = textwrap.dedent(f"""\
        import sys
        from batchlab.search import expand_studies, load_spec, next_runs, score_study
        studies = expand_studies(load_spec({str(MINIMAL_SPEC)!r}))
        next_runs(studies[0], [])
        score_study(studies[0], [])
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'optax', 'flax'))
        assert not bad, bad
        """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_minimal_example_spec_loads():
    # Every shipped spec is checked against the real workload registry in tests/runner.
    assert spec.expand_studies(spec.load_spec(MINIMAL_SPEC, known_workloads=KNOWN))


def test_the_readme_example_is_a_valid_spec():
    text = (REPO_ROOT / "experiments" / "README.md").read_text()
    # The first YAML block is the complete example; later ones are excerpts.
    block = re.findall(r"```yaml\n(.*?)```", text, re.S)[0]
    studies = spec.expand_studies(spec.load_spec(spec.read_yaml(block), known_workloads=KNOWN))
    assert [s.id for s in studies] == ["imagenet_resnet50.lars_pipeline.b32768.s6000.r0",
                                       "imagenet_resnet50.lars_pipeline.b32768.s6000.r1",
                                       "imagenet_resnet50.lars_pipeline.b65536.s3000.r0",
                                       "imagenet_resnet50.lars_pipeline.b65536.s3000.r1"]
