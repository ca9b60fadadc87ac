"""The ``batchlab`` command-line client."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # the commands import what they use when they run (a fast --help)
    from batchlab.client.experiments import ExperimentClient
    from batchlab.client.stack import Stack
    from batchlab.proto.v1 import experiment_pb2

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

    def on_array(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return lambda steps: fn(jnp.asarray(steps))

    png = plot_schedules(
        {k: on_array(fn) for k, fn in schedules.items()},
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


def _print_diagnostics(spec_path: str, console: Console) -> int:
    """Validate a spec and print its diagnostics; the count found (raises SpecError if invalid)."""
    from batchlab.search import load_spec
    from batchlab.search.diagnostics import spec_diagnostics
    from batchlab.train.workloads import workload_names

    spec = load_spec(spec_path, known_workloads=set(workload_names()))
    found = spec_diagnostics(spec)
    for diagnostic in found:
        console.print("[yellow]warning[/yellow] " + escape(str(diagnostic)), highlight=False,
                      soft_wrap=True)
    return len(found)


def _spec_check(args: argparse.Namespace) -> int:
    """Validate spec files and print their diagnostics without running anything."""
    from batchlab.search import SpecError

    console = Console()
    status = 0
    for path in args.specs:
        console.print(f"[bold]{path}[/bold]", highlight=False)
        try:
            found = _print_diagnostics(path, console)
        except SpecError as err:
            Console(stderr=True).print(f"[red]error:[/red] {err}", highlight=False)
            status = 2
            continue
        console.print(f"valid; {found} warning(s)" if found else "valid; no warnings")
        if found and args.strict:
            status = max(status, 1)
    return status


def _digest(args: argparse.Namespace) -> int:
    """Print a results folder's numbers, or compare them with an expected digest."""
    import json

    from batchlab.runner.digest import compare_digests, digest

    try:
        found = digest(args.results)
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}")
        return 2
    if args.compare is None:
        print(json.dumps(found, indent=1, sort_keys=True))
        return 0
    try:
        expected = json.loads(Path(args.compare).read_text())
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/red] --compare: {escape(str(err))}")
        return 2
    differences = compare_digests(found, expected)
    for line in differences:
        Console().print(escape(line), highlight=False)
    Console().print("identical" if not differences else
                    f"{len(differences)} difference(s) from {args.compare}")
    return 0 if not differences else 1


def _local_run(args: argparse.Namespace) -> int:
    """Run an experiment spec on this machine (runs in worker processes) and write its results and report."""
    from batchlab.runner import run_experiment
    from batchlab.search import SpecError

    try:
        _print_diagnostics(args.spec, Console(stderr=True))
        out = run_experiment(args.spec, args.out, data_dir=args.data_dir, progress=not args.no_progress,
                             parallel=args.parallel, threads_per_run=args.threads_per_run)
    except (SpecError, ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(f"interrupted: finished runs are stored in {args.out}; "
                                   "the same command resumes (unfinished runs start again)")
        return 130
    Console().print(f"results in {out}; report: {Path(out) / 'report' / 'report.md'}")
    experiment = json.loads((Path(out) / "experiment.json").read_text())
    if experiment.get("status") == "FAILED":
        Console(stderr=True).print(f"[red]FAILED:[/red] {escape(experiment.get('error', ''))}",
                                   soft_wrap=True)
        return 1
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


def _client(args: argparse.Namespace) -> ExperimentClient:
    from batchlab.client import ExperimentClient

    return ExperimentClient(args.controller, token=args.token)


def _rpc_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print gRPC errors as one line (status code and message) and exit with status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as err:
            from batchlab.client.experiments import default_controller_address, describe_error

            address = getattr(args, "controller", None) or default_controller_address()
            Console(stderr=True).print(f"[red]error:[/red] {escape(describe_error(err, address))}",
                                       soft_wrap=True, highlight=False)
            return 1

    return wrapper


def _stack(args: argparse.Namespace, **kwargs: Any) -> Stack:
    """The Stack the `up` flags describe (flags first, then BATCHLAB_*_ADDR, then defaults)."""
    from batchlab.client.stack import SERVICES, Stack

    ports = {s.name: getattr(args, f"{s.name}_port", None) for s in SERVICES}
    args.timeout = _up_timeout(args)  # checked before anything starts
    return Stack(args.state_dir, host=getattr(args, "host", None),
                 ports={k: v for k, v in ports.items() if v}, **kwargs)


def _start_stack(stack: Stack, args: argparse.Namespace) -> bool:
    """Start the stack, printing what it waits for; False (reported) when it did not start."""
    from batchlab.client.stack import StackError

    err_console = Console(stderr=True)
    try:
        stack.up(timeout=args.timeout, retries=args.retries,
                 progress=lambda line: err_console.print(escape(line), soft_wrap=True,
                                                         highlight=False, style="dim"))
    except StackError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True,
                          highlight=False)
        return False
    return True


def _up(args: argparse.Namespace) -> int:
    """Start the embedded stack (every service and a local Ray cluster; loopback by default)."""
    import shlex

    from batchlab.client.experiments import DEFAULT_CONTROLLER_ADDR, default_controller_address
    from batchlab.client.stack import StackError
    from batchlab.rpc.server import AUTH_TOKEN_ENV

    try:
        stack = _stack(args, token=args.token, num_trainers=args.trainers)
    except StackError as err:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        return 2
    if not _start_stack(stack, args):
        return 1
    console = Console()
    record = stack.read_record()
    assert record is not None, "Stack.up wrote the record"
    for name, info in record["services"].items():
        console.print(f"{name:12s} {info['address']:18s} pid {info['pid']}  log {info['log']}",
                      highlight=False, soft_wrap=True)
    controller = stack.address("controller")
    if controller not in (DEFAULT_CONTROLLER_ADDR, default_controller_address()):
        console.print(f"clients: export BATCHLAB_CONTROLLER_ADDR={controller}", highlight=False)
    if args.token:
        # Given on the command line, the token is already in the shell's history; a token from
        # the environment stays out of the terminal.
        console.print(escape(f"clients: export {AUTH_TOKEN_ENV}={shlex.quote(args.token)}"),
                      highlight=False, soft_wrap=True)
    elif os.environ.get(AUTH_TOKEN_ENV):
        console.print(f"clients: the servers require the token in ${AUTH_TOKEN_ENV}; keep it "
                      "exported where you run batchlab", highlight=False)
    console.print(f"state in {stack.state_dir}; stop with `batchlab down`", highlight=False)
    return 0


def _down(args: argparse.Namespace) -> int:
    """Stop the embedded stack."""
    from batchlab.client.stack import Stack

    # Only the record in the state folder matters here, not where a new stack would listen.
    stopped = Stack(args.state_dir, environ={}).down()
    Console().print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _load_spec_message(path: str) -> experiment_pb2.ExperimentSpec:
    from batchlab.search.spec import load_spec

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
        for diagnostic in exp.diagnostics:
            Console(stderr=True).print(
                "[yellow]warning[/yellow] " + escape(f"[{diagnostic.code}] "
                                                     f"{diagnostic.field_path}: "
                                                     f"{diagnostic.message}"),
                highlight=False, soft_wrap=True)
        if args.validate_only:
            Console().print(f"valid: {len(exp.studies)} studies")
            return 0
        Console().print(f"submitted {exp.name}")
        if args.wait:
            return _watch_until_done(client, exp.name)
    return 0


def _watch_until_done(client: ExperimentClient, name: str) -> int:
    from batchlab.client.watch import watch
    from batchlab.proto.v1 import controller_pb2

    last = watch(client.watch(name)) or client.get(name)
    state = controller_pb2.Experiment.State.Name(last.state)
    Console().print(f"{last.name}: {state}" + (f": {last.error}" if last.error else ""),
                    highlight=False, markup=False, soft_wrap=True)
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
    console = Console()
    console.print(table)
    # Below the table, not in it: the reason is a sentence (what no node of the cluster can
    # hold), and a column would wrap it into a tall, narrow block.
    for exp in experiments:
        if exp.pending_reason:
            console.print(escape(f"{exp.name} waits: {exp.pending_reason}"), highlight=False,
                          soft_wrap=True)
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
    from batchlab.client.stack import StackError

    console = Console()
    try:
        stack = _stack(args, num_trainers=args.trainers)
    except StackError as err:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        return 2
    console.print(f"starting the embedded stack in {stack.state_dir} ...")
    if not _start_stack(stack, args):
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


UP_TIMEOUT_ENV = "BATCHLAB_UP_TIMEOUT"
DEFAULT_UP_TIMEOUT_S = 180.0


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text[:40]!r}")
    return value


def _up_timeout(args: argparse.Namespace) -> float:
    """--timeout, else $BATCHLAB_UP_TIMEOUT, else 180 s.

    Raises:
      StackError: the variable is not a positive number of seconds (named in the message).
    """
    from batchlab.client.stack import StackError

    if args.timeout is not None:
        return float(args.timeout)
    raw = os.environ.get(UP_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_UP_TIMEOUT_S
    try:
        return _seconds(raw)
    except argparse.ArgumentTypeError as err:
        raise StackError(f"{UP_TIMEOUT_ENV}: {err}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


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


def _add_start_args(p: argparse.ArgumentParser) -> None:
    """Where the embedded stack listens and how long its start may take."""
    from batchlab.client.stack import SERVICES

    p.add_argument("--host", default=None,
                   help="interface every service binds (default: the host of its "
                        "BATCHLAB_<SERVICE>_ADDR, else 127.0.0.1)")
    for service in SERVICES:
        p.add_argument(f"--{service.name}-port", type=int, default=None, metavar="PORT",
                       help=f"{service.name} port (default: from BATCHLAB_{service.name.upper()}"
                            f"_ADDR, else {service.port})")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds each service may take to report SERVING (default "
                        f"${UP_TIMEOUT_ENV} or {DEFAULT_UP_TIMEOUT_S:g})")
    p.add_argument("--retries", type=int, default=2,
                   help="restarts of a service whose start failed for a passing reason "
                        "(e.g. Ray timing out on a loaded machine)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``batchlab`` command."""
    parser = argparse.ArgumentParser(prog="batchlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figure1", help="regenerate the paper's Figure 1 and Table 1")
    fig.add_argument("--out", default="results/figure1", help="output folder")
    fig.set_defaults(func=_figure1)

    spec = sub.add_parser("spec", help="work with experiment specs")
    spec_sub = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_sub.add_parser("check", help="validate specs and print their diagnostics "
                                              "(runs nothing)")
    check.add_argument("specs", nargs="+", metavar="SPEC", help="experiment spec files (YAML)")
    check.add_argument("--strict", action="store_true",
                       help="exit with status 1 when there is a warning")
    check.set_defaults(func=_spec_check)

    dig = sub.add_parser("digest", help="print the numbers of a results folder that the "
                                        "determinism contract covers, or compare them")
    dig.add_argument("results", help="a results folder (experiment.json, runs/, studies/)")
    dig.add_argument("--compare", default=None, metavar="EXPECTED",
                     help="a digest file to compare with; exit 1 on any difference")
    dig.set_defaults(func=_digest)

    local = sub.add_parser("local", help="run experiments in this process (no services)")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    run = local_sub.add_parser("run", help="run an experiment spec; rerunning resumes it")
    run.add_argument("spec", help="experiment spec (YAML)")
    run.add_argument("--out", required=True, help="results folder")
    run.add_argument("--data-dir", default=None, help="tfds data folder (default: BATCHLAB_DATA_DIR)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--parallel", type=_positive_int, default=None, metavar="P",
                     help="runs at once, each in a worker process (default: sized to the cores and "
                          "the model; 1: one at a time); never changes results")
    run.add_argument("--threads-per-run", type=_positive_int, default=None, metavar="T",
                     help="XLA:CPU threads of each run (default: 1 for small models, all CPUs for "
                          "large ones); results depend on it, so a resumed folder keeps its own")
    run.set_defaults(func=_local_run)

    rep = sub.add_parser("report", help="write an experiment's report (from the controller, or a local results folder)")
    rep.add_argument("experiment", help="experiments/ID (or ID) on the controller, or a local results folder")
    rep.add_argument("--out", default=None, help="report folder (default: ./report-ID, or RESULTS/report)")
    _add_connection_args(rep)
    rep.set_defaults(func=_report)

    up = sub.add_parser("up", help="start the embedded stack (127.0.0.1:50051-50054 by default)")
    up.add_argument("--state-dir", default=None, help="state folder (default $BATCHLAB_DATA_DIR or ./.batchlab)")
    up.add_argument("--token", default=None, help="auth token every server requires")
    up.add_argument("--trainers", type=int, default=2, help="Ray trainer actors")
    _add_start_args(up)
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
    _add_start_args(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchlab`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
