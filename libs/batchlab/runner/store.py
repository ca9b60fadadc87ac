"""The on-disk layout of an experiment's results, shared by the local runner and the reports.

OUT/experiment.json                      the spec, its studies, status and timestamps
OUT/runs/<study_id>/t{T}_r{R}_a{A}.json  one file per run attempt: request + result (+ the
                                         runner session and code that wrote it)
OUT/studies/<study_id>.json              the study's best trial and score, once finished
OUT/states/<study_id>/t{T}/              trial T's tuning run's final parameters (and batch
                                         stats), an orbax checkpoint, when its workload sets
                                         keep_final_state: what a warm start reads

Every file is written atomically (temporary file + rename), so a run interrupted at any
moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchlab.files import atomic_write
from batchlab.search.protocol import RUN_FILE_PATTERN, RunRecord, RunRequest, run_file_name

__all__ = ["ResultStore"]


def _write_json(path: Path, payload: Any) -> None:
    atomic_write(path, json.dumps(payload, indent=1, sort_keys=True, allow_nan=True))


class ResultStore:
    """Reads and writes one experiment's results folder.

    Args:
      root: the experiment's output folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def experiment_path(self) -> Path:
        return self.root / "experiment.json"

    def run_path(self, request: RunRequest) -> Path:
        name = run_file_name(request.trial_index, request.replica, request.attempt)
        return self.root / "runs" / request.study_id / name

    def study_path(self, study_id: str) -> Path:
        return self.root / "studies" / f"{study_id}.json"

    def state_dir(self, study_id: str, trial_index: int) -> Path:
        """Where the final state of a trial's tuning run is kept (see the module docstring)."""
        return self.root / "states" / study_id / f"t{trial_index}"

    def read_study(self, study_id: str) -> dict[str, Any] | None:
        """A finished study's summary (best trial, score), or None while it is not finished."""
        path = self.study_path(study_id)
        return json.loads(path.read_text()) if path.exists() else None

    def write_experiment(self, payload: dict[str, Any]) -> None:
        _write_json(self.experiment_path(), payload)

    def read_experiment(self) -> dict[str, Any] | None:
        path = self.experiment_path()
        return json.loads(path.read_text()) if path.exists() else None

    def write_run(self, request: RunRequest, result: dict[str, Any], *,
                  written_by: dict[str, Any] | None = None) -> None:
        """Store one attempt; ``written_by`` ({"started_at", "code"}: the runner session
        writing it) lets a report credit each file to the code that made it."""
        payload: dict[str, Any] = {"request": request.to_dict(), "result": result}
        if written_by is not None:
            payload["written_by"] = written_by
        _write_json(self.run_path(request), payload)

    def write_study(self, study_id: str, payload: dict[str, Any]) -> None:
        _write_json(self.study_path(study_id), payload)

    def count_runs(self) -> int:
        """How many run files the folder holds, over every study."""
        return sum(1 for _ in (self.root / "runs").glob(f"*/{RUN_FILE_PATTERN}"))

    def requests(self, study_id: str) -> list[tuple[Path, dict[str, Any]]]:
        """Every stored attempt's request (as written by write_run) with its file, in order.

        Raises:
          ValueError: a file that is not a run record (naming it).
        """
        out = []
        for path in sorted((self.root / "runs" / study_id).glob(RUN_FILE_PATTERN)):
            try:
                request = json.loads(path.read_text())["request"]
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: malformed run record ({err})") from err
            if not isinstance(request, dict):
                raise ValueError(f"{path}: malformed run record (request is not a mapping)")
            out.append((path, request))
        return out

    def records(self, study_id: str) -> list[RunRecord]:
        """Every stored attempt of a study as protocol records, in a stable order."""
        folder = self.root / "runs" / study_id
        out = []
        for path in sorted(folder.glob(RUN_FILE_PATTERN)):
            try:
                payload = json.loads(path.read_text())
                req, res = payload["request"], payload["result"]
                out.append(RunRecord.from_result(req["trial_index"], req["seed"], res))
            except (KeyError, ValueError, TypeError, UnicodeDecodeError,
                    json.JSONDecodeError) as err:
                raise ValueError(f"{path}: malformed run record ({err})") from err
        return out
