"""ExperimentService: experiments as resources with states, over a storage.

Clients submit specs (validated up front, idempotent by request_id, dry-run with
validate_only), read and list experiments and trials (paginated with opaque tokens), stream
an experiment's progress (WatchExperiment), cancel it, and fetch its report. Trainers report
metric points (ReportProgress), keyed by (trial, attempt, step) so a retried report never
double counts; the answer tells them to stop when their experiment was cancelled.

The servicer holds no state of its own: everything is read from and written to the injected
storage, and the scheduler (services.controller.scheduler) does the running. Errors are the
domain exceptions of batchlab.rpc.errors, turned into status codes by `handle_errors`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from batchlab import limits
from batchlab.limits import shorten
from batchlab.proto.v1 import common_pb2, controller_pb2, controller_pb2_grpc, experiment_pb2
from batchlab.rpc.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    handle_errors,
)
from batchlab.search import SpecError, Study, expand_studies, spec_to_dict, validate_spec
from batchlab.search.admission import check_request_id
from batchlab.search.diagnostics import spec_diagnostics
from services.controller.results import write_results
from services.controller.scheduler import StudyCache, latest_attempts
from services.controller.storage import (
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    ExperimentState,
    ExperimentStorage,
    PointRecord,
    StudyRecord,
    TrialKey,
)

__all__ = ["ExperimentServicer", "PageToken"]

log = logging.getLogger(__name__)

Experiment = controller_pb2.Experiment
SpecDiagnostic = controller_pb2.SpecDiagnostic
Trial = controller_pb2.Trial

# Matched whole (fullmatch): "$" would also accept a name ending in a newline. Ids are at
# most 128 characters (an experiment id is its spec name, <= 63, and 9 more); trial and
# replica numbers are ASCII digits, at most 9 of them, so that they fit every integer column.
_EXPERIMENT_NAME = re.compile(r"experiments/([A-Za-z0-9._-]{1,128})")
_STUDY_NAME = re.compile(r"experiments/([A-Za-z0-9._-]{1,128})/studies/([A-Za-z0-9._-]{1,256})")
_TRIAL_NAME = re.compile(r"experiments/([A-Za-z0-9._-]{1,128})/studies/([A-Za-z0-9._-]{1,256})"
                         r"/trials/([0-9]{1,9})-r([0-9]{1,9})")
# Page keys are storage row ids: SQLite integers are signed 64-bit.
_MAX_PAGE_KEY = 2**63 - 1

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Points per WatchExperiment message: a stream sends about 9k messages/s on loopback, so
# batching keeps a busy experiment's stream far below that.
MAX_POINTS_PER_MESSAGE = 1000


class PageToken:
    """Opaque page tokens: base64 of JSON {"p": what is listed, "a": the last key seen}.

    The token names what it pages (ListExperiments, or ListTrials of one parent), so a
    token used with another parent is refused rather than silently skipping items.
    """

    @staticmethod
    def encode(scope: str, after: int) -> str:
        """The token continuing after key `after` of `scope`."""
        raw = json.dumps({"p": scope, "a": after}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(token: str, scope: str, field: str = "page_token") -> int:
        """The key a token continues after (0 for an empty token).

        Raises:
          InvalidArgument: the token is malformed or belongs to another listing.
        """
        if not token:
            return 0
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            after = data["a"]
            owner = data["p"]
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InvalidArgument(field, "is not a token this server issued") from None
        if (owner != scope or not isinstance(after, int) or isinstance(after, bool)
                or not 0 <= after <= _MAX_PAGE_KEY):
            raise InvalidArgument(field, "belongs to another listing (use it with the "
                                         "request that returned it)")
        return after


def _page_size(value: int, field: str = "page_size") -> int:
    if value < 0:
        raise InvalidArgument(field, f"must be >= 0, got {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(round(seconds * 1e9)))
    return stamp


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    json_format.ParseDict(_json_safe(dict(data)), struct)
    return struct


def _json_safe(value: Any) -> Any:
    """JSON data a Struct can hold: non-finite numbers become strings ("inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def experiment_id_of(name: str, field: str = "name") -> str:
    """The id in experiments/{id}.

    Raises:
      InvalidArgument: naming `field`, for anything else.
    """
    match = _EXPERIMENT_NAME.fullmatch(name or "")
    if match is None:
        raise InvalidArgument(field, f"must be experiments/{{id}}, got {shorten(name)}")
    return match.group(1)


def trial_key_of(name: str, field: str) -> TrialKey:
    """The TrialKey of experiments/{e}/studies/{s}/trials/{t}-r{r}.

    Raises:
      InvalidArgument: naming `field`, for anything else.
    """
    match = _TRIAL_NAME.fullmatch(name or "")
    if match is None:
        raise InvalidArgument(field, "must be experiments/{e}/studies/{s}/trials/{t}-r{r} "
                                     f"(t and r: up to 9 digits), got {shorten(name)}")
    e, s, t, r = match.groups()
    return TrialKey(e, s, int(t), int(r))


def _outcome_value(name: str | None) -> common_pb2.Outcome:
    return common_pb2.Outcome.Value(name) if name else common_pb2.OUTCOME_UNSPECIFIED


def _failure_value(name: str) -> controller_pb2.Failure:
    """batchlab.v1.Failure of a stored Failure value ("" -> FAILURE_UNSPECIFIED)."""
    return (controller_pb2.Failure.Value(f"FAILURE_{name}") if name
            else controller_pb2.FAILURE_UNSPECIFIED)


def aggregate_from_score(score: Mapping[str, Any]) -> controller_pb2.StudyAggregate:
    """A StudyAggregate from batchlab.search.StudyScore.to_dict()."""
    seeds = score.get("seeds") or {}
    metric = seeds.get("metric") or {}
    effort = score.get("effort") or {}
    aggregate = controller_pb2.StudyAggregate(
        seeds=int(seeds.get("finished") or 0),
        fraction_reaching_target=float(seeds.get("fraction_reaching_target") or 0.0),
        # StudyScore.to_dict() writes infinity as "inf"; None (nothing finished) is inf too.
        median_steps_to_target=float(seeds.get("median_steps_to_target") or math.inf),
        feasible_trials=int(effort.get("feasible_trials") or 0),
        diverged_trials=int(effort.get("diverged_trials") or 0),
        total_trials=int(effort.get("total_trials") or 0),
        total_steps=int(effort.get("total_steps") or 0),
        detail=_struct(score),
    )
    for field in ("median", "q25", "q75", "min", "max"):
        value = metric.get(field)
        if value is not None:
            setattr(aggregate, field, float(value))
    return aggregate


class ExperimentServicer(controller_pb2_grpc.ExperimentServiceServicer):
    """The ExperimentService over a storage.

    Args:
      storage: where experiments, attempts, points and scores live.
      known_workloads: registered workload names specs are checked against (None: any).
      studies: the StudyCache shared with the scheduler.
      scheduler: told to act at once on submissions and cancellations (`wake()`), or None.
      metrics: batchlab.rpc.metrics ControllerMetrics, or None.
      watch_period_s: default period of WatchExperiment messages.
      min_watch_period_s: the shortest period a client may ask for. Each message of each open
        watch reads the experiment's attempts and points, so the floor bounds what watchers
        cost unary calls (125 watches at 0.05 s slowed GetExperiment; at 0.5 s they do not).
      results_dir: where GetReport writes each experiment's results layout and report
        (results_dir/<experiment id>); None: a temporary folder per call.
    """

    def __init__(self, storage: ExperimentStorage, *,
                 known_workloads: Collection[str] | None = None,
                 studies: StudyCache | None = None, scheduler: Any = None, metrics: Any = None,
                 watch_period_s: float = 1.0, min_watch_period_s: float = 0.5,
                 results_dir: str | Path | None = None):
        self.storage = storage
        self.known_workloads = None if known_workloads is None else frozenset(known_workloads)
        self.studies = studies or StudyCache()
        self.scheduler = scheduler
        self.metrics = metrics
        self.watch_period_s = watch_period_s
        self.min_watch_period_s = min_watch_period_s
        self.results_dir = None if results_dir is None else Path(results_dir)
        self._stopping = threading.Event()
        self._report_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe

    def close(self) -> None:
        """End open WatchExperiment streams (the server is stopping)."""
        self._stopping.set()

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

    # -- reading ----------------------------------------------------------------------------
    def _reread(self, experiment_id: str) -> ExperimentRecord:
        """An experiment read again from storage, which never deletes one."""
        record = self.storage.get_experiment(experiment_id)
        assert record is not None, f"experiment {experiment_id} vanished from storage"
        return record

    def _get(self, name: str, field: str = "name") -> ExperimentRecord:
        experiment_id = experiment_id_of(name, field)
        record = self.storage.get_experiment(experiment_id)
        if record is None:
            raise NotFound(name)
        return record

    def _trial(self, latest: AttemptRecord, first: AttemptRecord,
               history: Sequence[AttemptRecord] = ()) -> controller_pb2.Trial:
        result = latest.result or {}
        stt = result.get("steps_to_target")
        trial = Trial(
            name=latest.trial.name,
            trial_index=latest.trial.trial_index,
            replica=latest.trial.replica,
            kind=latest.kind,
            seed=latest.seed,
            hyperparameters=_struct(latest.hyperparameters),
            state=Trial.State.Value(latest.state.value),
            outcome=_outcome_value(latest.outcome),
            attempt=latest.attempt,
            step=int(latest.step),
            final_metrics={k: float("nan") if v is None else float(v)
                           for k, v in (result.get("final_metrics") or {}).items()},
            steps_to_target=math.inf if stt is None else float(stt),
            error=latest.error,
            worker=latest.worker,
            failure=_failure_value(latest.failure),
            pending_reason=latest.pending_reason,
        )
        for attempt in history:
            trial.attempts.append(controller_pb2.TrialAttempt(
                attempt=attempt.attempt, state=Trial.State.Value(attempt.state.value),
                outcome=_outcome_value(attempt.outcome), failure=_failure_value(attempt.failure),
                error=attempt.error, worker=attempt.worker, counted=attempt.counted))
        for field, seconds in (("start_time", first.start_time or latest.start_time),
                               ("end_time", latest.end_time)):
            stamp = _timestamp(seconds)
            if stamp is not None:
                getattr(trial, field).CopyFrom(stamp)
        return trial

    def _trials(self, attempts: Sequence[AttemptRecord]) -> list[controller_pb2.Trial]:
        first: dict[TrialKey, AttemptRecord] = {}
        history: dict[TrialKey, list[AttemptRecord]] = {}
        for attempt in attempts:
            current = first.get(attempt.trial)
            if current is None or attempt.attempt < current.attempt:
                first[attempt.trial] = attempt
            history.setdefault(attempt.trial, []).append(attempt)
        return [self._trial(a, first[a.trial], sorted(history[a.trial], key=lambda r: r.attempt))
                for a in latest_attempts(attempts)]

    def _study(self, experiment_id: str, study: Study,
               record: StudyRecord | None) -> controller_pb2.Study:
        message = controller_pb2.Study(
            name=f"experiments/{experiment_id}/studies/{study.id}",
            workload=study.workload,
            optimizer=study.optimizer,
            batch_size=study.batch_size,
            step_budget=study.step_budget,
            phase=record.phase if record is not None else "tuning",
            # batchlab.targets.Goal carries the proto's numbers; the generated stubs type the
            # proto's enum as its own int subclass, which plain ints are at run time.
            target=experiment_pb2.Target(metric=study.target.metric, value=study.target.value,
                                         goal=cast(common_pb2.Goal, int(study.target.goal))),
        )
        if record is not None:
            if record.best_trial is not None:
                message.best_trial = record.best_trial
            message.aggregate.CopyFrom(aggregate_from_score(record.score))
        return message

    def _experiment(self, record: ExperimentRecord,
                    attempts: Sequence[AttemptRecord] | None = None) -> controller_pb2.Experiment:
        if attempts is None:
            attempts = self.storage.attempts(record.id)
        message = Experiment(
            name=record.name,
            state=Experiment.State.Value(record.state.value),
            request_id=record.request_id,
            error=record.error,
        )
        json_format.ParseDict(dict(record.spec), message.spec)
        for field, seconds in (("create_time", record.create_time),
                               ("start_time", record.start_time),
                               ("end_time", record.end_time)):
            stamp = _timestamp(seconds)
            if stamp is not None:
                getattr(message, field).CopyFrom(stamp)
        counts = message.trial_counts
        for attempt in latest_attempts(attempts):
            if attempt.state is AttemptState.QUEUED:
                counts.pending += 1
                message.pending_reason = message.pending_reason or attempt.pending_reason
            elif attempt.state is AttemptState.ACTIVE:
                counts.running += 1
            elif attempt.state is AttemptState.EVALUATING:
                counts.evaluating += 1
            elif attempt.outcome:
                field = attempt.outcome.lower()
                setattr(counts, field, getattr(counts, field) + 1)
        stored = self.storage.studies(record.id)
        for study in self.studies.get(record):
            message.studies.append(self._study(record.id, study, stored.get(study.id)))
        return message

    # -- RPCs -------------------------------------------------------------------------------
    @handle_errors
    def SubmitExperiment(self, request: controller_pb2.SubmitExperimentRequest,
                         context: grpc.ServicerContext) -> controller_pb2.Experiment:
        """Validate and store an experiment; the same request_id returns the first one."""
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "required: the ExperimentSpec to run")
        spec = request.spec
        id_problem = check_request_id(request.request_id)
        if id_problem is not None:
            raise InvalidArgument("request_id", id_problem)
        try:
            validate_spec(spec, known_workloads=self.known_workloads)
            studies = expand_studies(spec)
        except SpecError as error:
            raise _spec_error(error) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            # The validators crashed on what a client sent: a validator bug that the client
            # cannot fix, but their spec is the cause, so not INTERNAL. Logged in full.
            log.error("validating %s crashed", shorten(spec.name), exc_info=error)
            raise InvalidArgument("spec", f"could not be validated ({type(error).__name__}; "
                                          "the controller's log has the details)") from None
        spec_dict = spec_to_dict(spec)
        diagnostics = [SpecDiagnostic(code=d.code, field_path=d.where, message=d.message)
                       for d in spec_diagnostics(spec)]
        if request.validate_only:
            message = Experiment(spec=spec, state=Experiment.PENDING,
                                 request_id=request.request_id, diagnostics=diagnostics)
            for study in studies:
                message.studies.append(self._study("-", study, None))
            return message
        experiment_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        record, created = self.storage.create_experiment(experiment_id, request.request_id,
                                                         spec_dict)
        if not created and dict(record.spec) != spec_dict:
            conflict = AlreadyExists(record.name, f"request_id {request.request_id!r} was used "
                                                  "for a different spec")
            conflict.field_path = "request_id"
            raise conflict
        if created:
            log.info("submitted %s (%d studies, request_id %r)", record.name, len(studies),
                     request.request_id)
            self._wake()
        message = self._experiment(record)
        message.diagnostics.extend(diagnostics)
        return message

    @handle_errors
    def GetExperiment(self, request: controller_pb2.GetExperimentRequest,
                      context: grpc.ServicerContext) -> controller_pb2.Experiment:
        """The experiment, its trial counts and studies."""
        return self._experiment(self._get(request.name))

    @handle_errors
    def ListExperiments(self, request: controller_pb2.ListExperimentsRequest,
                        context: grpc.ServicerContext) -> controller_pb2.ListExperimentsResponse:
        """Experiments in submission order, a page at a time."""
        size = _page_size(request.page_size)
        after = PageToken.decode(request.page_token, "experiments")
        found = self.storage.list_experiments(after_seq=after, limit=size + 1)
        page = found[:size]
        response = controller_pb2.ListExperimentsResponse(
            experiments=[self._experiment(r) for r in page])
        if len(found) > size:
            response.next_page_token = PageToken.encode("experiments", page[-1].seq)
        return response

    @handle_errors
    def ListTrials(self, request: controller_pb2.ListTrialsRequest,
                   context: grpc.ServicerContext) -> controller_pb2.ListTrialsResponse:
        """Trials (latest attempt of each) of an experiment or one of its studies."""
        parent = request.parent
        study_id = None
        match = _STUDY_NAME.fullmatch(parent or "")
        if match is not None:
            record = self._get(f"experiments/{match.group(1)}", "parent")
            study_id = match.group(2)
            if study_id not in {s.id for s in self.studies.get(record)}:
                raise NotFound(parent)
        else:
            record = self._get(parent, "parent")
        size = _page_size(request.page_size)
        after = PageToken.decode(request.page_token, f"trials:{parent}")
        attempts = self.storage.attempts(record.id, study_id=study_id)
        # Trials are ordered by their first attempt, whose storage id is the page key: a
        # trial started later lands on a later page, never between pages already read.
        first_ids: dict[TrialKey, int] = {}
        for attempt in attempts:
            first_ids.setdefault(attempt.trial, attempt.id)
        remaining = [a for a in attempts
                     if first_ids[a.trial] > after]
        trials = self._trials(remaining)
        page = trials[:size]
        response = controller_pb2.ListTrialsResponse(trials=page)
        if len(trials) > size:
            last = trial_key_of(page[-1].name, "parent")
            response.next_page_token = PageToken.encode(f"trials:{parent}", first_ids[last])
        return response

    @handle_errors
    def WatchExperiment(self, request: controller_pb2.WatchExperimentRequest,
                        context: grpc.ServicerContext
                        ) -> Iterator[controller_pb2.WatchExperimentResponse]:
        """Stream snapshots, changed trials and new points until the experiment ends."""
        record = self._get(request.name)
        period = request.period_seconds or self.watch_period_s
        if not math.isfinite(period) or period < 0:
            raise InvalidArgument("period_seconds", f"must be >= 0, got {period}")
        period = min(max(period, self.min_watch_period_s), 60.0)
        yield from self._watch(record.id, period, context)

    def _watch(self, experiment_id: str, period: float,
               context: Any) -> Iterator[controller_pb2.WatchExperimentResponse]:
        after_seq = 0
        seen: dict[str, bytes] = {}
        while True:
            record = self._reread(experiment_id)
            attempts = self.storage.attempts(experiment_id)
            points = self.storage.points(experiment_id, after_seq=after_seq,
                                         limit=MAX_POINTS_PER_MESSAGE)
            response = controller_pb2.WatchExperimentResponse(
                experiment=self._experiment(record, attempts))
            for trial in self._trials(attempts):
                fingerprint = trial.SerializeToString(deterministic=True)
                if seen.get(trial.name) != fingerprint:
                    seen[trial.name] = fingerprint
                    response.trials.append(trial)
            for point in points:
                response.points.append(controller_pb2.MetricPoint(
                    trial=point.trial.name, attempt=point.attempt, step=point.step,
                    values=dict(point.values)))
            if points:
                after_seq = points[-1].seq
            yield response
            more_points = len(points) == MAX_POINTS_PER_MESSAGE
            if record.terminal and not more_points:
                return
            if self._stopping.is_set() or not _active(context):
                return
            if more_points:
                continue  # a backlog goes out page after page, as fast as the client reads
            deadline = time.monotonic() + period
            while time.monotonic() < deadline:
                if self._stopping.is_set() or not _active(context):
                    return
                self._stopping.wait(min(0.1, deadline - time.monotonic()))

    @handle_errors
    def CancelExperiment(self, request: controller_pb2.CancelExperimentRequest,
                         context: grpc.ServicerContext) -> controller_pb2.Experiment:
        """Cancel a pending or running experiment; its running trials are told to stop."""
        record = self._get(request.name)
        if record.state is not ExperimentState.CANCELLED:
            if record.terminal:
                raise FailedPrecondition(f"{record.name} already ended {record.state.value}; "
                                         "only a pending or running experiment can be "
                                         "cancelled")
            changed, cancelled = self.storage.end_experiment(
                record.id, ExperimentState.CANCELLED,
                expected=[ExperimentState.PENDING, ExperimentState.RUNNING],
                cancel_error="experiment cancelled")
            if not changed:  # it ended meanwhile
                record = self._reread(record.id)
                if record.state is not ExperimentState.CANCELLED:
                    raise FailedPrecondition(f"{record.name} already ended "
                                             f"{record.state.value}")
            log.info("cancelled %s (%d queued attempts dropped)", record.name, cancelled)
            self._wake()
        return self._experiment(self._reread(record.id))

    @handle_errors
    def GetReport(self, request: controller_pb2.GetReportRequest,
                  context: grpc.ServicerContext) -> controller_pb2.Report:
        """report.md and its PNGs built from the stored results."""
        record = self._get(request.name)
        studies = self.storage.studies(record.id)
        if not any(s.phase == "done" for s in studies.values()):
            raise FailedPrecondition(f"{record.name}: no study has finished yet; the report "
                                     "needs at least one")
        from batchlab.report import write_report

        attempts = self.storage.attempts(record.id)
        with self._report_lock, tempfile.TemporaryDirectory(prefix="batchlab-report-") as tmp:
            root = (self.results_dir / record.id) if self.results_dir else Path(tmp)
            write_results(root, record, self.studies.get(record), attempts, studies)
            report_path = write_report(root)
            report = controller_pb2.Report(markdown=report_path.read_text(encoding="utf-8"))
            for path in sorted(report_path.parent.rglob("*.png")):
                report.files.append(controller_pb2.ReportFile(
                    name=path.relative_to(report_path.parent).as_posix(),
                    content=path.read_bytes()))
        return report

    @handle_errors
    def ReportProgress(self, request: controller_pb2.ReportProgressRequest,
                       context: grpc.ServicerContext
                       ) -> controller_pb2.ReportProgressResponse:
        """Store a trainer's metric points; cancel=True when its experiment was stopped."""
        points: list[PointRecord] = []
        attempts: dict[tuple[TrialKey, int], AttemptRecord] = {}
        if len(request.points) > limits.MAX_POINTS_PER_REPORT:
            raise InvalidArgument("points", f"at most {limits.MAX_POINTS_PER_REPORT} per call "
                                            f"(batchlab.limits), got {len(request.points)}")
        for i, point in enumerate(request.points):
            key = trial_key_of(point.trial, f"points[{i}].trial")
            if point.attempt < 1:
                raise InvalidArgument(f"points[{i}].attempt", f"must be >= 1, got "
                                                              f"{point.attempt}")
            if point.step > limits.MAX_STEPS:
                raise InvalidArgument(f"points[{i}].step", f"must be at most {limits.MAX_STEPS} "
                                                           f"(batchlab.limits), got {point.step}")
            for name in point.values:
                if len(name) > limits.MAX_METRIC_NAME_CHARS or not name.isprintable():
                    raise InvalidArgument(f"points[{i}].values", "metric names must be "
                                          f"printable, at most {limits.MAX_METRIC_NAME_CHARS} "
                                          f"characters, got {shorten(name)}")
            if (not point.awaiting_evaluation
                    and getattr(self.scheduler, "evaluations", None) is not None):
                # With the evaluation service an evaluation point's metrics come from the
                # evaluator only; a trainer's own point would claim the (trial, attempt,
                # step) key ahead of the real one and stand in for the evaluator's numbers.
                raise InvalidArgument(f"points[{i}].awaiting_evaluation",
                                      "must be true: this controller evaluates with the "
                                      "evaluation service, which gives every point's "
                                      "evaluation metrics")
            if (key, point.attempt) not in attempts:
                attempt = self.storage.get_attempt(key, point.attempt)
                if attempt is None:
                    raise NotFound(f"{point.trial} attempt {point.attempt}")
                attempts[(key, point.attempt)] = attempt
            points.append(PointRecord(key, point.attempt, point.step, dict(point.values),
                                      awaiting_evaluation=point.awaiting_evaluation))
        self.storage.add_points(points)
        if any(p.awaiting_evaluation for p in points):
            evaluations = getattr(self.scheduler, "evaluations", None)
            if evaluations is not None:
                evaluations.wake()
        cancel = False
        experiments: dict[str, ExperimentRecord | None] = {}
        for (key, _), attempt in attempts.items():
            if key.experiment_id not in experiments:
                experiments[key.experiment_id] = self.storage.get_experiment(key.experiment_id)
            experiment = experiments[key.experiment_id]
            # A cancelled or failed experiment, or an attempt already given up (its
            # controller restarted): the trainer should stop.
            if (experiment is None or experiment.state in (ExperimentState.CANCELLED,
                                                           ExperimentState.FAILED)
                    or attempt.state is AttemptState.COMPLETED):
                cancel = True
            if self.metrics is not None:
                self.metrics.record_progress(key.experiment_id, key.study_id,
                                             f"{key.trial_index}-r{key.replica}")
        return controller_pb2.ReportProgressResponse(cancel=cancel)


def _active(context: Any) -> bool:
    is_active = getattr(context, "is_active", None)
    return True if is_active is None else bool(is_active())


def _spec_error(error: SpecError) -> InvalidArgument:
    """A SpecError as INVALID_ARGUMENT naming the request field (spec.<path>)."""
    def path(p: str) -> str:
        return f"spec.{p}" if p else "spec"

    first_path, first_message = error.problems[0]
    reason = first_message
    if len(error.problems) > 1:
        rest = "; ".join(f"{path(p)}: {m}" for p, m in error.problems[1:])
        reason = f"{first_message} (and {len(error.problems) - 1} more: {rest})"
    return InvalidArgument(path(first_path), reason)
