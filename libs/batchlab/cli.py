"""The ``batchlab`` command-line client."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["main"]


def _figure1(args: argparse.Namespace) -> int:
    """Regenerate the paper's Figure 1 and print its Table 1 from the stored configurations."""
    import jax.numpy as jnp

    from batchlab.optim import learning_rate_fn, paper_config, table1_differences
    from batchlab.report.figures import plot_schedules

    lars, nesterov = paper_config("lars_pipeline_32k"), paper_config("nesterov_b_32k")
    schedules = {
        "LARS (MLPerf pipeline)": learning_rate_fn(lars.optimizer),
        "Nesterov, configuration B": learning_rate_fn(nesterov.optimizer),
    }
    out = Path(args.out)
    png = plot_schedules(
        {k: (lambda s, fn=fn: fn(jnp.asarray(s))) for k, fn in schedules.items()},
        lars.total_steps,
        out / "figure1_schedules.png",
        title="Figure 1: LARS vs. Nesterov (config B), batch 32,768",
        markers=[lars.optimizer["weights"]["learning_rate"]["warmup_steps"]],
    )
    table = Table(title="Table 1: configuration B vs. the LARS pipeline (batch 32,768, 2,512 steps)")
    for column in ("hyperparameter", "Nesterov", "LARS"):
        table.add_column(column)
    for name, a, b in table1_differences():
        table.add_row(name, f"{a:g}", f"{b:g}")
    console = Console()
    console.print(table)
    for label, fn in schedules.items():
        values = ", ".join(f"t={t}: {float(fn(t)):.6g}" for t in (0, 353, 706, 1609, 2512))
        console.print(f"{label}: {values}")
    console.print(f"wrote {png}")
    return 0


def _local_run(args: argparse.Namespace) -> int:
    """Run an experiment spec in this process and write its results and report."""
    from batchlab.runner import run_experiment
    from batchlab.search import SpecError

    try:
        out = run_experiment(args.spec, args.out, data_dir=args.data_dir, progress=not args.no_progress)
    except (SpecError, ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    Console().print(f"results in {out}; report: {Path(out) / 'report' / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Rebuild the report of a stored experiment."""
    from batchlab.report import write_report

    try:
        path = write_report(args.results, args.out)
    except (ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    Console().print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``batchlab`` command."""
    parser = argparse.ArgumentParser(prog="batchlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figure1", help="regenerate the paper's Figure 1 and Table 1")
    fig.add_argument("--out", default="results/figure1", help="output folder")
    fig.set_defaults(func=_figure1)

    local = sub.add_parser("local", help="run experiments in this process (no services)")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    run = local_sub.add_parser("run", help="run an experiment spec; rerunning resumes it")
    run.add_argument("spec", help="experiment spec (YAML)")
    run.add_argument("--out", required=True, help="results folder")
    run.add_argument("--data-dir", default=None, help="tfds data folder (default: BATCHLAB_DATA_DIR)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_local_run)

    rep = sub.add_parser("report", help="rebuild the report of stored results")
    rep.add_argument("results", help="results folder of an experiment")
    rep.add_argument("--out", default=None, help="report folder (default: RESULTS/report)")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchlab`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
