"""batchlab.report: tables and plots built from stored results and configurations.

`write_report(results_dir)` reads an experiment's stored results (experiment.json, runs/,
studies/; see batchlab.report.results) and writes results_dir/report/report.md with its PNG
figures. Nothing is recomputed from models or data, so a finished (or still running)
experiment can be reported again at any time, and the same stored results give a
byte-identical report.md. No JAX: numpy, matplotlib (Agg) and json only.

    from batchlab.report import write_report
    write_report("results/minimal")          # -> results/minimal/report/report.md

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check": Tables 2 and 4, Figures 1 and 4.
"""

from __future__ import annotations

from batchlab.report.markdown import build_markdown, write_report
from batchlab.report.results import load_results

__all__ = ["build_markdown", "load_results", "write_report"]
