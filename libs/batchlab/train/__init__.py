"""batchlab.train: train_step / eval_step / the loop, steps-to-target, divergence, checkpoints."""

from batchlab.train.loop import Goal, RunConfig, RunResult, Target, train_and_evaluate
from batchlab.train.parallel import DataParallel
from batchlab.train.workloads import WORKLOADS, Workload, get_workload, workload_names

__all__ = [
    "WORKLOADS",
    "DataParallel",
    "Goal",
    "RunConfig",
    "RunResult",
    "Target",
    "Workload",
    "get_workload",
    "train_and_evaluate",
    "workload_names",
]
