"""The ``batchlab`` command-line client."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["main"]

# The embedded default of `make run` (run from the repository root): a small real study.
_DEMO_SPEC = Path("experiments") / "demo.yaml"


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
    """Write a report: from a local results folder, or fetched from the controller."""
    from batchlab.report import write_report

    if not Path(args.experiment).is_dir():
        if args.out is None:
            args.out = f"report-{args.experiment.rsplit('/', 1)[-1]}"
        return _remote_report(args)
    try:
        path = write_report(args.experiment, args.out)
    except (ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    Console().print(f"wrote {path}")
    return 0


def _client(args: argparse.Namespace):
    from batchlab.client import ExperimentClient

    return ExperimentClient(args.controller, token=args.token)


def _rpc_errors(fn):
    """Print gRPC errors as one line (status code and message) and exit with status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as err:
            from batchlab.client.experiments import describe_error

            Console(stderr=True).print(f"[red]error:[/red] {describe_error(err)}")
            return 1

    return wrapper


def _up(args: argparse.Namespace) -> int:
    """Start the embedded stack (all services on 127.0.0.1, a local Ray cluster)."""
    from batchlab.client.stack import Stack, StackError

    stack = Stack(args.state_dir, token=args.token, num_trainers=args.trainers)
    try:
        record = stack.up(timeout=args.timeout)
    except StackError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 1
    console = Console()
    for name, info in record["services"].items():
        console.print(f"{name:12s} {info['address']:18s} pid {info['pid']}  log {info['log']}")
    console.print(f"state in {stack.state_dir}; stop with `batchlab down`")
    return 0


def _down(args: argparse.Namespace) -> int:
    """Stop the embedded stack."""
    from batchlab.client.stack import Stack

    stopped = Stack(args.state_dir).down()
    Console().print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _load_spec_message(path: str):
    from batchlab.search import load_spec

    return load_spec(path, validate_optimizers=False)


@_rpc_errors
def _submit(args: argparse.Namespace) -> int:
    """Submit a spec to the controller; with --wait, watch it until it ends."""
    from batchlab.search import SpecError

    try:
        spec = _load_spec_message(args.spec)
    except (SpecError, ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    with _client(args) as client:
        exp = client.submit(spec, request_id=args.request_id, validate_only=args.validate_only)
        if args.validate_only:
            Console().print(f"valid: {len(exp.studies)} studies")
            return 0
        Console().print(f"submitted {exp.name}")
        if args.wait:
            return _watch_until_done(client, exp.name)
    return 0


def _watch_until_done(client, name: str) -> int:
    from batchlab.client.watch import watch
    from batchlab.proto.v1 import controller_pb2

    last = watch(client.watch(name)) or client.get(name)
    state = controller_pb2.Experiment.State.Name(last.state)
    Console().print(f"{last.name}: {state}")
    return 0 if state == "SUCCEEDED" else 1


@_rpc_errors
def _watch(args: argparse.Namespace) -> int:
    """Follow an experiment live until it ends."""
    with _client(args) as client:
        return _watch_until_done(client, args.experiment)


@_rpc_errors
def _status(args: argparse.Namespace) -> int:
    """List experiments (or show one) with their state and trial counts."""
    from batchlab.proto.v1 import controller_pb2

    state_name = controller_pb2.Experiment.State.Name
    with _client(args) as client:
        experiments = [client.get(args.experiment)] if args.experiment else list(client.list())
    table = Table()
    for col in ("experiment", "spec", "state", "queued", "running", "succeeded", "diverged", "failed"):
        table.add_column(col)
    for exp in experiments:
        c = exp.trial_counts
        table.add_row(exp.name, exp.spec.name, state_name(exp.state), str(c.pending), str(c.running),
                      str(c.succeeded), str(c.diverged), str(c.failed))
    Console().print(table)
    return 0


@_rpc_errors
def _cancel(args: argparse.Namespace) -> int:
    """Cancel an experiment."""
    with _client(args) as client:
        exp = client.cancel(args.experiment)
    Console().print(f"{exp.name}: cancel requested")
    return 0


@_rpc_errors
def _remote_report(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.report(args.experiment, args.out)
    Console().print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Start the embedded stack, run experiments/demo.yaml through it, write its report, stop."""
    from batchlab.client import ExperimentClient
    from batchlab.client.stack import Stack, StackError

    console = Console()
    stack = Stack(args.state_dir, num_trainers=args.trainers)
    try:
        console.print(f"starting the embedded stack in {stack.state_dir} ...")
        stack.up(timeout=args.timeout)
    except StackError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 1
    try:
        spec = _load_spec_message(args.spec)
        with ExperimentClient(stack.address("controller")) as client:
            exp = client.submit(spec)
            console.print(f"submitted {exp.name} ({spec.name}); watching ...")
            status = _watch_until_done(client, exp.name)
            path = client.report(exp.name, args.out)
            console.print(f"report: {path}")
        return status
    finally:
        console.print("stopping the stack ...")
        stack.down()


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    from batchlab.client.experiments import default_controller_address

    p.add_argument("--controller", default=None,
                   help=f"controller host:port (default $BATCHLAB_CONTROLLER_ADDR or {default_controller_address()})")
    p.add_argument("--token", default=None, help="auth token (default $BATCHLAB_AUTH_TOKEN)")


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

    rep = sub.add_parser("report", help="write an experiment's report (from the controller, or a local results folder)")
    rep.add_argument("experiment", help="experiments/ID (or ID) on the controller, or a local results folder")
    rep.add_argument("--out", default=None, help="report folder (default: ./report-ID, or RESULTS/report)")
    _add_connection_args(rep)
    rep.set_defaults(func=_report)

    up = sub.add_parser("up", help="start the embedded stack on 127.0.0.1")
    up.add_argument("--state-dir", default=None, help="state folder (default $BATCHLAB_DATA_DIR or ./.batchlab)")
    up.add_argument("--token", default=None, help="auth token every server requires")
    up.add_argument("--trainers", type=int, default=2, help="Ray trainer actors")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the embedded stack")
    down.add_argument("--state-dir", default=None)
    down.set_defaults(func=_down)

    submit = sub.add_parser("submit", help="submit an experiment spec to the controller")
    submit.add_argument("spec", help="experiment spec (YAML)")
    submit.add_argument("--request-id", default=None, help="idempotency key (default: derived from the spec)")
    submit.add_argument("--validate-only", action="store_true", help="validate on the server, store nothing")
    submit.add_argument("--wait", type=_boolean, nargs="?", const=True, default=False,
                        help="watch until the experiment ends (--wait, --wait=true or --wait=false)")
    _add_connection_args(submit)
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="experiments and their state")
    status.add_argument("experiment", nargs="?", default=None)
    _add_connection_args(status)
    status.set_defaults(func=_status)

    watch = sub.add_parser("watch", help="follow an experiment live")
    watch.add_argument("experiment")
    _add_connection_args(watch)
    watch.set_defaults(func=_watch)

    cancel = sub.add_parser("cancel", help="cancel an experiment")
    cancel.add_argument("experiment")
    _add_connection_args(cancel)
    cancel.set_defaults(func=_cancel)

    demo = sub.add_parser("demo", help="run experiments/demo.yaml through the embedded stack end to end")
    demo.add_argument("--spec", default=str(_DEMO_SPEC), help="spec to run (default: the embedded demo)")
    demo.add_argument("--out", default="results/demo", help="report folder")
    demo.add_argument("--state-dir", default=None, help="state folder (default $BATCHLAB_DATA_DIR or ./.batchlab)")
    demo.add_argument("--trainers", type=int, default=2)
    demo.add_argument("--timeout", type=float, default=180.0)
    demo.set_defaults(func=_demo)
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
