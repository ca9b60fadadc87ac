"""What SubmitExperiment and the other ExperimentService calls refuse, by class of client
mistake (issue 9, part 4): names matched whole, control characters, the documented maxima,
meaning checked against the workload declarations, out-of-range integers, huge values."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from controller_fakes import spec_dict
from fake_context import Aborted, FakeContext
from google.protobuf import json_format

from batchlab import limits
from batchlab.proto.v1 import controller_pb2, experiment_pb2
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY, MAX_MESSAGE_CHARS
from batchlab.search.admission import check_spec
from batchlab.workloads import DECLARATIONS
from services.controller.servicer import ExperimentServicer
from services.controller.storage import InMemoryStorage


@pytest.fixture
def servicer():
    return ExperimentServicer(InMemoryStorage(), known_workloads=set(DECLARATIONS))


def _submit(servicer, spec, request_id=""):
    request = controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec, experiment_pb2.ExperimentSpec()),
        request_id=request_id, validate_only=True)
    return servicer.SubmitExperiment(request, FakeContext())


def _refused(call, request) -> Aborted:
    with pytest.raises(Aborted) as info:
        result = call(request, FakeContext())
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, info.value.details
    return info.value


def _submit_refused(servicer, spec, request_id="") -> Aborted:
    request = controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec, experiment_pb2.ExperimentSpec()),
        request_id=request_id, validate_only=True)
    return _refused(servicer.SubmitExperiment, request)


def _path(error: Aborted) -> str:
    return error.trailing_metadata[FIELD_PATH_METADATA_KEY]


def test_the_shared_spec_is_accepted(servicer):
    assert len(_submit(servicer, spec_dict()).studies) == 1


@pytest.mark.parametrize("name", ["tiny\n", "tiny\r\n", "tiny\x00", "\ntiny", "tiny "])
def test_spec_name_must_match_whole(servicer, name):
    error = _submit_refused(servicer, spec_dict(name=name))
    assert _path(error) == "spec.name"
    assert "\n" not in error.details  # quoted with escapes


def test_optimizer_name_and_search_path_must_match_whole(servicer):
    spec = spec_dict()
    spec["optimizers"][0]["name"] = "nesterov\n"
    assert _path(_submit_refused(servicer, spec)) == "spec.optimizers[0].name"
    spec = spec_dict()
    spec["optimizers"][0]["search_space"]["parameters"][0]["path"] += "\n"
    assert _path(_submit_refused(servicer, spec)) == \
        "spec.optimizers[0].search_space.parameters[0].path"


def test_control_characters_are_refused_but_a_description_keeps_newlines(servicer):
    assert _submit(servicer, spec_dict(description="two\nlines\tand a tab"))
    error = _submit_refused(servicer, spec_dict(description="bell\x07"))
    assert _path(error) == "spec.description"
    spec = spec_dict()
    spec["optimizers"][0]["config"]["momentum\x1b"] = 0.9
    assert "control characters" in _submit_refused(servicer, spec).details


@pytest.mark.parametrize("name", ["experiments/a\n", "experiments/a/b", "experiments/",
                                  "experiments/" + "x" * 100_000])
def test_experiment_names_must_match_whole(servicer, name):
    error = _refused(servicer.GetExperiment, controller_pb2.GetExperimentRequest(name=name))
    assert _path(error) == "name"
    assert len(error.details) < 200


@pytest.mark.parametrize("trial", [
    "experiments/e/studies/s/trials/0-r0\n",
    "experiments/e/studies/s/trials/99999999999999999999-r0",  # past any integer column
    "experiments/e/studies/s/trials/\u0663-r0",  # an Arabic-Indic digit: \d would take it
])
def test_trial_ids_are_ascii_and_bounded(servicer, trial):
    request = controller_pb2.ReportProgressRequest(
        points=[controller_pb2.MetricPoint(trial=trial, attempt=1, step=1)])
    assert _path(_refused(servicer.ReportProgress, request)) == "points[0].trial"


def test_report_progress_steps_and_metric_names_are_bounded(servicer):
    trial = "experiments/e/studies/s/trials/0-r0"
    for point, field in [
        (controller_pb2.MetricPoint(trial=trial, attempt=1, step=2**64 - 1), "points[0].step"),
        (controller_pb2.MetricPoint(trial=trial, attempt=1, step=1, values={"a\n": 1.0}),
         "points[0].values"),
        (controller_pb2.MetricPoint(trial=trial, attempt=1, step=1, values={"m" * 200: 1.0}),
         "points[0].values"),
    ]:
        error = _refused(servicer.ReportProgress,
                         controller_pb2.ReportProgressRequest(points=[point]))
        assert _path(error) == field


@pytest.mark.parametrize("after", [2**63, 2**70, -1, 1.5, "3", True])
def test_page_tokens_with_out_of_range_keys_are_refused(servicer, after):
    raw = json.dumps({"p": "experiments", "a": after}).encode()
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    error = _refused(servicer.ListExperiments,
                     controller_pb2.ListExperimentsRequest(page_token=token))
    assert _path(error) == "page_token"


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s["workloads"][0]["points"][0].update(batch_size=limits.MAX_BATCH_SIZE + 1),
     "spec.workloads[0].points[0].batch_size"),
    (lambda s: s["workloads"][0]["points"][0].update(step_budget=limits.MAX_STEPS + 1),
     "spec.workloads[0].points[0].step_budget"),
    (lambda s: s.update(trials_per_study=limits.MAX_TRIALS_PER_STUDY + 1,
                        max_total_trials=limits.MAX_TRIALS_PER_STUDY + 1),
     "spec.trials_per_study"),
    (lambda s: s.update(seeds_per_best=limits.MAX_SEEDS_PER_BEST + 1), "spec.seeds_per_best"),
    (lambda s: s.update(max_attempts=limits.MAX_ATTEMPTS + 1), "spec.max_attempts"),
    (lambda s: s.update(resources={"memory_gib": 1e300}), "spec.resources.memory_gib"),
    (lambda s: s.update(resources={"memory_gib": limits.MAX_MEMORY_GIB_PER_HOST + 0.5}),
     "spec.resources.memory_gib"),
    (lambda s: s.update(resources={"cpus": 1e300}), "spec.resources.cpus"),
    (lambda s: s.update(description="d" * (limits.MAX_DESCRIPTION_CHARS + 1)),
     "spec.description"),
    (lambda s: s["optimizers"][0]["search_space"]["parameters"].extend(
        [{"path": f"optimizer.p{i}", "fixed": {"value": 1}}
         for i in range(limits.MAX_SEARCH_DIMENSIONS)]),
     "spec.optimizers[0].search_space.parameters"),
    (lambda s: s["workloads"][0].update(points=[{"batch_size": b, "step_budget": 20}
                                                for b in range(1, limits.MAX_POINTS_PER_WORKLOAD
                                                               + 2)]),
     "spec.workloads[0].points"),
])
def test_values_past_the_documented_maxima_are_refused(servicer, mutate, field):
    spec = spec_dict()
    mutate(spec)
    error = _submit_refused(servicer, spec)
    assert _path(error) == field
    assert "batchlab.limits" in error.details


def test_a_huge_memory_request_is_refused_in_one_short_line(servicer):
    error = _submit_refused(servicer, spec_dict(resources={"memory_gib": 1e300}))
    assert error.details.endswith("resources.memory_gib: must be at most 65,536 GiB per host "
                                  "(batchlab.limits), got 1e+300"), error.details


def test_the_maxima_themselves_are_accepted():
    spec = spec_dict(trials_per_study=limits.MAX_TRIALS_PER_STUDY,
                     max_total_trials=limits.MAX_TRIALS_PER_STUDY,
                     seeds_per_best=limits.MAX_SEEDS_PER_BEST,
                     description="d" * limits.MAX_DESCRIPTION_CHARS)
    spec["workloads"][0]["points"][0].update(batch_size=limits.MAX_BATCH_SIZE,
                                             step_budget=limits.MAX_STEPS)
    spec["resources"] = {"cpus": limits.MAX_CPUS_PER_HOST,
                         "memory_gib": limits.MAX_MEMORY_GIB_PER_HOST}
    assert check_spec(json_format.ParseDict(spec, experiment_pb2.ExperimentSpec())) == []


@pytest.mark.parametrize("metric", ["aaaaaaaaaaaaaaaaaaaa", "validation/mlm_accuracy",
                                    "validation/accuracy\n", "test/accuracy"])
def test_a_target_metric_the_workload_never_reports_is_refused(servicer, metric):
    spec = spec_dict()
    spec["workloads"][0]["target"]["metric"] = metric
    error = _submit_refused(servicer, spec)
    assert _path(error) == "spec.workloads[0].target.metric"


@pytest.mark.parametrize("metric", ["validation/accuracy", "validation/loss", "train/accuracy"])
def test_a_reported_target_metric_is_accepted(servicer, metric):
    spec = spec_dict()
    spec["workloads"][0]["target"]["metric"] = metric
    assert _submit(servicer, spec).studies


@pytest.mark.parametrize("hyperparameters, field", [
    ({"bn_momentum": "high"}, "bn_momentum"),
    ({"gamma_0": [1.0]}, "gamma_0"),
    ({"label_smoothing": {"value": 0.1}}, "label_smoothing"),
    ({"virtual_batch_size": 2.5}, "virtual_batch_size"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"dropout": 0.1}, "dropout"),
])
def test_workload_hyperparameters_of_the_wrong_kind_are_refused(servicer, hyperparameters,
                                                                field):
    spec = spec_dict()
    spec["workloads"][0]["hyperparameters"] = hyperparameters
    assert _path(_submit_refused(servicer, spec)) == f"spec.workloads[0].hyperparameters.{field}"


@pytest.mark.parametrize("hyperparameters, reason", [
    ({"microbatch_size": 24}, "24 does not divide batch_size 32 (points[0])"),
    ({"microbatch_size": 8}, "8 is not a multiple of virtual_batch_size 16 (points[0])"),
    ({"microbatch_size": 16, "virtual_batch_size": 0}, "needs a virtual_batch_size"),
])
def test_a_microbatch_size_that_cannot_split_a_point_is_refused_at_submission(
        servicer, hyperparameters, reason):
    spec = spec_dict()
    spec["workloads"][0]["hyperparameters"] = hyperparameters
    error = _submit_refused(servicer, spec)
    assert _path(error) == "spec.workloads[0].hyperparameters.microbatch_size"
    assert reason in error.details
    spec["workloads"][0]["hyperparameters"] = {"microbatch_size": 16}
    assert _submit(servicer, spec).studies


@pytest.mark.parametrize("parameter, workload_hp, reason", [
    ({"path": "workload.microbatch_size", "fixed": {"value": 24}}, {},
     "microbatch_size 24 does not divide batch_size 32"),
    ({"path": "workload.microbatch_size", "discrete": {"values": [16, 24]}}, {},
     "microbatch_size 24 does not divide batch_size 32"),
    ({"path": "workload.virtual_batch_size", "fixed": {"value": 0}}, {"microbatch_size": 16},
     "needs a virtual_batch_size"),
])
def test_a_searched_value_that_cannot_split_a_point_is_refused_at_submission(
        servicer, parameter, workload_hp, reason):
    # The same check as for the workload's own value: a run with it would fail.
    spec = spec_dict()
    spec["workloads"][0]["hyperparameters"] = workload_hp
    spec["optimizers"][0]["search_space"]["parameters"].append(parameter)
    error = _submit_refused(servicer, spec)
    assert _path(error) == "spec.optimizers[0].search_space.parameters[1].path"
    assert reason in error.details and "points[0]" in error.details
    spec["optimizers"][0]["search_space"]["parameters"][1] = {
        "path": "workload.microbatch_size", "discrete": {"values": [0, 16, 32]}}
    assert _submit(servicer, spec).studies


def test_a_search_parameter_writing_a_bad_workload_value_is_refused(servicer):
    spec = spec_dict()
    spec["optimizers"][0]["search_space"]["parameters"].append(
        {"path": "workload.label_smoothing", "discrete": {"values": [0.0, "lots"]}})
    error = _submit_refused(servicer, spec)
    assert _path(error) == "spec.optimizers[0].search_space.parameters[1].path"
    assert "'lots'" in error.details
    spec["optimizers"][0]["search_space"]["parameters"][1] = {
        "path": "workload.label_smoothing", "linear": {"min": 0.0, "max": 0.2}}
    assert _submit(servicer, spec).studies


@pytest.mark.parametrize("config, field", [
    ({"optimizer": ["nesterov"], "learning_rate": 0.1}, "optimizer"),
    ({"optimizer": {"name": "nesterov"}, "learning_rate": 0.1}, "optimizer"),
    ({"optimizer": "nesterov", "learning_rate": {"schedule": ["cosine"], "peak_value": 0.1}},
     "learning_rate.schedule"),
    ({"optimizer": "nesterov", "learning_rate": 0.1, "momentum": "0.9"}, "momentum"),
])
def test_a_list_or_object_where_a_string_belongs_names_the_field(servicer, config, field):
    spec = spec_dict()
    spec["optimizers"][0]["config"] = config
    spec["optimizers"][0]["search_space"] = {}
    assert _path(_submit_refused(servicer, spec)) == f"spec.optimizers[0].config.{field}"


@pytest.mark.parametrize("request_id", ["r" * (limits.MAX_REQUEST_ID_CHARS + 1), "id\n"])
def test_request_ids_are_bounded(servicer, request_id):
    assert _path(_submit_refused(servicer, spec_dict(), request_id)) == "request_id"


def test_a_huge_bad_name_is_quoted_as_a_short_prefix(servicer):
    error = _submit_refused(servicer, spec_dict(name="x" * (1 << 20)))
    assert len(error.details) <= MAX_MESSAGE_CHARS + 100
    assert "1048576 characters" in error.details
