"""ExperimentService methods called directly (fake context): status codes, idempotency,
pagination, progress reports, watch streams and reports, on a fake trainer pool."""

from __future__ import annotations

import math

import grpc
import pytest
from controller_fakes import WORKLOAD, FakePool, spec_dict
from fake_context import Aborted, FakeContext
from google.protobuf import json_format

from batchlab.proto.v1 import common_pb2, controller_pb2, experiment_pb2
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY
from services.controller.scheduler import Scheduler, StudyCache
from services.controller.servicer import ExperimentServicer, PageToken
from services.controller.storage import InMemoryStorage


class Harness:
    """A servicer and a scheduler on one in-memory storage and a fake pool."""

    def __init__(self) -> None:
        self.storage = InMemoryStorage()
        self.pool = FakePool()
        studies = StudyCache()
        self.scheduler = Scheduler(self.storage, self.pool, studies=studies)
        self.servicer = ExperimentServicer(self.storage, known_workloads={WORKLOAD},
                                           studies=studies, scheduler=self.scheduler,
                                           watch_period_s=0.05, min_watch_period_s=0.05)

    def submit(self, spec=None, request_id="", validate_only=False):
        request = controller_pb2.SubmitExperimentRequest(
            spec=json_format.ParseDict(spec or spec_dict(), experiment_pb2.ExperimentSpec()),
            request_id=request_id, validate_only=validate_only)
        return self.servicer.SubmitExperiment(request, FakeContext())

    def run_to_end(self, name, ticks=50):
        for _ in range(ticks):
            self.scheduler.tick()
            experiment = self.servicer.GetExperiment(
                controller_pb2.GetExperimentRequest(name=name), FakeContext())
            if experiment.state not in (controller_pb2.Experiment.PENDING,
                                        controller_pb2.Experiment.RUNNING):
                return experiment
        raise AssertionError("experiment did not end")


@pytest.fixture
def harness():
    return Harness()


def _abort(call, request, context=None):
    context = context or FakeContext()
    with pytest.raises(Aborted) as info:
        result = call(request, context)
        if hasattr(result, "__next__"):  # a stream aborts when iterated
            list(result)
    return info.value


def test_invalid_spec_is_invalid_argument_naming_the_field(harness):
    spec = spec_dict()
    spec["workloads"][0]["workload"] = "mnist2d"
    request = controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec, experiment_pb2.ExperimentSpec()))
    error = _abort(harness.servicer.SubmitExperiment, request)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("spec.workloads[0].workload: unknown workload 'mnist2d'")
    assert error.trailing_metadata[FIELD_PATH_METADATA_KEY] == "spec.workloads[0].workload"
    # Several problems: all named, the first in the metadata.
    spec = spec_dict(trials_per_study=0)
    spec["workloads"][0]["points"][0]["batch_size"] = 0
    error = _abort(harness.servicer.SubmitExperiment, controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec, experiment_pb2.ExperimentSpec())))
    assert error.trailing_metadata[FIELD_PATH_METADATA_KEY] == "spec.trials_per_study"
    assert "spec.workloads[0].points[0].batch_size" in error.details
    error = _abort(harness.servicer.SubmitExperiment, controller_pb2.SubmitExperimentRequest())
    assert (error.code, error.trailing_metadata[FIELD_PATH_METADATA_KEY]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "spec")
    assert harness.storage.list_experiments() == []


def test_unknown_or_malformed_names(harness):
    error = _abort(harness.servicer.GetExperiment,
                   controller_pb2.GetExperimentRequest(name="experiments/nope"))
    assert error.code is grpc.StatusCode.NOT_FOUND and "experiments/nope" in error.details
    error = _abort(harness.servicer.GetExperiment,
                   controller_pb2.GetExperimentRequest(name="nope"))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    for call, request in [
        (harness.servicer.CancelExperiment,
         controller_pb2.CancelExperimentRequest(name="experiments/x")),
        (harness.servicer.GetReport, controller_pb2.GetReportRequest(name="experiments/x")),
        (harness.servicer.ListTrials, controller_pb2.ListTrialsRequest(parent="experiments/x")),
        (harness.servicer.WatchExperiment,
         controller_pb2.WatchExperimentRequest(name="experiments/x")),
    ]:
        assert _abort(call, request).code is grpc.StatusCode.NOT_FOUND
    name = harness.submit().name
    error = _abort(harness.servicer.ListTrials,
                   controller_pb2.ListTrialsRequest(parent=f"{name}/studies/unknown"))
    assert error.code is grpc.StatusCode.NOT_FOUND


def test_same_request_id_returns_the_same_experiment(harness):
    first = harness.submit(request_id="req-1")
    again = harness.submit(request_id="req-1")
    assert first.name == again.name and first.name.startswith("experiments/tiny-")
    assert first.state == controller_pb2.Experiment.PENDING
    assert len(harness.storage.list_experiments()) == 1
    assert harness.submit(request_id="req-2").name != first.name
    error = _abort(harness.servicer.SubmitExperiment, controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec_dict(search_seed=9), experiment_pb2.ExperimentSpec()),
        request_id="req-1"))
    assert error.code is grpc.StatusCode.ALREADY_EXISTS
    assert error.trailing_metadata[FIELD_PATH_METADATA_KEY] == "request_id"


def test_validate_only_stores_nothing(harness):
    experiment = harness.submit(request_id="dry", validate_only=True)
    assert experiment.name == "" and experiment.spec.name == "tiny"
    assert [s.name.rsplit("/", 1)[1] for s in experiment.studies] == [
        f"{WORKLOAD}.nesterov.b32.s20"]
    assert harness.storage.list_experiments() == []
    # The request id was not used up either.
    assert harness.submit(request_id="dry").name


def test_list_experiments_paginates_with_opaque_tokens(harness):
    names = [harness.submit(request_id=f"r{i}").name for i in range(5)]
    seen, token, pages = [], "", 0
    while True:
        response = harness.servicer.ListExperiments(
            controller_pb2.ListExperimentsRequest(page_size=2, page_token=token), FakeContext())
        seen += [e.name for e in response.experiments]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert (seen, pages) == (names, 3)
    for bad in ("garbage!", PageToken.encode("trials:experiments/x", 1), "e30"):
        error = _abort(harness.servicer.ListExperiments,
                       controller_pb2.ListExperimentsRequest(page_token=bad))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.trailing_metadata[FIELD_PATH_METADATA_KEY] == "page_token"
    error = _abort(harness.servicer.ListExperiments,
                   controller_pb2.ListExperimentsRequest(page_size=-1))
    assert error.trailing_metadata[FIELD_PATH_METADATA_KEY] == "page_size"


def test_list_trials_paginates_and_filters_by_study(harness):
    name = harness.submit().name
    final = harness.run_to_end(name)
    assert final.state == controller_pb2.Experiment.SUCCEEDED
    assert (final.trial_counts.succeeded, final.trial_counts.pending) == (3, 0)
    (study,) = final.studies
    assert study.phase == "done" and study.best_trial == 1
    assert study.aggregate.seeds == 1 and study.aggregate.total_trials == 2
    assert study.aggregate.HasField("median")
    trials, token = [], ""
    while True:
        response = harness.servicer.ListTrials(
            controller_pb2.ListTrialsRequest(parent=study.name, page_size=2, page_token=token),
            FakeContext())
        trials += list(response.trials)
        token = response.next_page_token
        if not token:
            break
    assert [t.name.rsplit("/", 1)[1] for t in trials] == ["0-r0", "1-r0", "1-r1"]
    rerun = trials[2]
    assert (rerun.kind, rerun.state, rerun.outcome, rerun.attempt, rerun.step) == (
        "rerun", controller_pb2.Trial.COMPLETED, common_pb2.SUCCEEDED, 1, 20)
    assert rerun.final_metrics["validation/accuracy"] > 0
    assert rerun.hyperparameters["optimizer"]["optimizer"] == "nesterov"
    error = _abort(harness.servicer.ListTrials, controller_pb2.ListTrialsRequest(
        parent=name, page_token=PageToken.encode(f"trials:{study.name}", 1)))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT


def test_report_progress_is_idempotent_and_says_cancel(harness):
    name = harness.submit().name
    harness.pool.hold = True
    harness.scheduler.tick()
    trial = f"{name}/studies/{WORKLOAD}.nesterov.b32.s20/trials/0-r0"
    points = [controller_pb2.MetricPoint(trial=trial, attempt=1, step=s,
                                         values={"validation/accuracy": s / 100})
              for s in (10, 20)]
    request = controller_pb2.ReportProgressRequest(points=points)
    assert not harness.servicer.ReportProgress(request, FakeContext()).cancel
    assert not harness.servicer.ReportProgress(request, FakeContext()).cancel  # a retry
    stored = harness.storage.points(name.split("/")[1])
    assert [(p.step, p.values["validation/accuracy"]) for p in stored] == [(10, 0.1),
                                                                            (20, 0.2)]
    harness.servicer.CancelExperiment(controller_pb2.CancelExperimentRequest(name=name),
                                      FakeContext())
    assert harness.servicer.ReportProgress(request, FakeContext()).cancel
    for bad, field in [
        (controller_pb2.MetricPoint(trial="trials/0", attempt=1, step=1), "points[0].trial"),
        (controller_pb2.MetricPoint(trial=trial, attempt=0, step=1), "points[0].attempt"),
    ]:
        error = _abort(harness.servicer.ReportProgress,
                       controller_pb2.ReportProgressRequest(points=[bad]))
        assert (error.code, error.trailing_metadata[FIELD_PATH_METADATA_KEY]) == (
            grpc.StatusCode.INVALID_ARGUMENT, field)
    error = _abort(harness.servicer.ReportProgress, controller_pb2.ReportProgressRequest(
        points=[controller_pb2.MetricPoint(trial=trial, attempt=7, step=1)]))
    assert error.code is grpc.StatusCode.NOT_FOUND


def test_cancel_stops_trials_and_a_finished_experiment_cannot_be_cancelled(harness):
    name = harness.submit().name
    harness.pool.hold = True
    harness.scheduler.tick()
    cancelled = harness.servicer.CancelExperiment(
        controller_pb2.CancelExperimentRequest(name=name), FakeContext())
    assert cancelled.state == controller_pb2.Experiment.CANCELLED
    harness.scheduler.tick()
    assert len(harness.pool.stopped) == 2  # both running trials were told to stop
    again = harness.servicer.CancelExperiment(
        controller_pb2.CancelExperimentRequest(name=name), FakeContext())
    assert again.state == controller_pb2.Experiment.CANCELLED
    harness.pool.hold = False
    done = harness.submit(request_id="other").name
    harness.run_to_end(done)
    error = _abort(harness.servicer.CancelExperiment,
                   controller_pb2.CancelExperimentRequest(name=done))
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION


def test_watch_streams_until_the_experiment_ends(harness):
    name = harness.submit().name
    harness.scheduler.start()
    try:
        messages = list(harness.servicer.WatchExperiment(
            controller_pb2.WatchExperimentRequest(name=name, period_seconds=0.05),
            FakeContext()))
    finally:
        harness.scheduler.stop()
    assert messages[-1].experiment.state == controller_pb2.Experiment.SUCCEEDED
    states = {}
    for message in messages:
        for trial in message.trials:
            states.setdefault(trial.name.rsplit("/", 1)[1], []).append(trial.state)
    assert set(states) == {"0-r0", "1-r0", "1-r1"}
    assert all(s[-1] == controller_pb2.Trial.COMPLETED for s in states.values())
    # A client that goes away ends the stream.
    context = FakeContext()
    context.cancel()
    other = harness.submit(request_id="watch-2").name
    assert len(list(harness.servicer.WatchExperiment(
        controller_pb2.WatchExperimentRequest(name=other), context))) == 1


def test_report_needs_a_finished_study_then_has_markdown_and_pngs(harness, tmp_path):
    name = harness.submit().name
    error = _abort(harness.servicer.GetReport, controller_pb2.GetReportRequest(name=name))
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    harness.run_to_end(name)
    harness.servicer.results_dir = tmp_path
    report = harness.servicer.GetReport(controller_pb2.GetReportRequest(name=name),
                                        FakeContext())
    assert report.markdown.startswith("# Optimizer comparison: `tiny`")
    assert report.files and all(f.content.startswith(b"\x89PNG") for f in report.files)
    assert all(f.name.startswith("figures/") for f in report.files)
    # The results layout is the local runner's: the report library read it.
    experiment_id = name.split("/")[1]
    assert (tmp_path / experiment_id / "experiment.json").exists()
    assert len(list((tmp_path / experiment_id / "runs").rglob("*.json"))) == 3


def test_trial_steps_to_target_is_infinite_when_never_reached(harness):
    spec = spec_dict()
    spec["workloads"][0]["target"]["value"] = 0.99
    name = harness.submit(spec).name
    harness.run_to_end(name)
    response = harness.servicer.ListTrials(controller_pb2.ListTrialsRequest(parent=name),
                                           FakeContext())
    assert all(math.isinf(t.steps_to_target) for t in response.trials)


def test_a_watch_period_below_the_floor_is_raised_to_it():
    """Many fast watchers would each re-read the experiment 20 times a second."""
    from services.controller.servicer import ExperimentServicer

    servicer = ExperimentServicer(InMemoryStorage())
    assert servicer.min_watch_period_s == 0.5
    seen = []
    servicer._watch = lambda experiment_id, period, context: iter(seen.append(period) or ())
    name = servicer.SubmitExperiment(controller_pb2.SubmitExperimentRequest(
        spec=json_format.ParseDict(spec_dict(), experiment_pb2.ExperimentSpec())), None).name
    for asked in (0.01, 0.0, 5.0, 600.0):
        list(servicer.WatchExperiment(controller_pb2.WatchExperimentRequest(
            name=name, period_seconds=asked), None))
    assert seen == [0.5, 1.0, 5.0, 60.0]


def test_a_watch_whose_client_left_stops_reading_its_backlog(harness, monkeypatch):
    """A backlog is streamed page after page; a client gone after the first page ends it."""
    import services.controller.servicer as servicer_module
    from services.controller.storage import PointRecord, TrialKey

    monkeypatch.setattr(servicer_module, "MAX_POINTS_PER_MESSAGE", 2)
    name = harness.submit().name
    experiment_id = name.split("/")[1]
    trial = TrialKey(experiment_id, "study", 0, 0)
    harness.servicer.storage.add_points(
        [PointRecord(trial=trial, attempt=1, step=s, values={"loss": 1.0}) for s in range(1, 8)])
    reads = []
    real_points = harness.servicer.storage.points
    monkeypatch.setattr(harness.servicer.storage, "points",
                        lambda *a, **k: reads.append(k) or real_points(*a, **k))
    context = FakeContext()
    stream = harness.servicer.WatchExperiment(
        controller_pb2.WatchExperimentRequest(name=name, period_seconds=0.5), context)
    first = next(stream)
    assert [p.step for p in first.points] == [1, 2]
    context.cancel()
    assert list(stream) == []  # no further page is read for a client that left
    assert len(reads) == 1
    # A client that stays reads the whole backlog, two points a message, without waiting.
    stream = harness.servicer.WatchExperiment(
        controller_pb2.WatchExperimentRequest(name=name, period_seconds=60), FakeContext())
    steps = [p.step for _ in range(4) for p in next(stream).points]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
