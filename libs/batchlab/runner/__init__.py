"""batchlab.runner: run an experiment spec in this process (no services), resumably."""

from batchlab.runner.local import run_experiment
from batchlab.runner.store import ResultStore

__all__ = ["ResultStore", "run_experiment"]
