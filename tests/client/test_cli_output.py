"""What the client commands print beyond counts: why an experiment waits (`status`, `status
EXP`, `watch`), and how clients pass the token `batchlab up --token` started the stack with.
A fake client stands in for the controller; the CLI code that prints is the real one."""

from __future__ import annotations

import contextlib

import pytest
from rich.console import Console

from batchlab import cli
from batchlab.client import stack as stack_module
from batchlab.client.watch import render
from batchlab.proto.v1 import controller_pb2
from batchlab.rpc.client import free_ports

# What the controller's scheduler writes when no node can hold a run (services/controller).
REASON = ("needs 1 host with CPU 1, GPU 99 each; the Ray cluster's 1 node cannot hold that "
          "(largest: CPU 2, GPU 0)")


def _experiment(name: str, reason: str = "") -> controller_pb2.Experiment:
    exp = controller_pb2.Experiment(name=name, state=controller_pb2.Experiment.PENDING,
                                    pending_reason=reason)
    exp.spec.name = "demo"
    exp.trial_counts.pending = 2
    return exp


class _FakeClient:
    def __init__(self, experiments):
        self.experiments = {e.name: e for e in experiments}

    def get(self, name):
        return self.experiments[_full_name(name)]

    def list(self):
        return iter(self.experiments.values())

    def watch(self, name):
        yield controller_pb2.WatchExperimentResponse(experiment=self.get(name))


def _full_name(name: str) -> str:
    return name if "/" in name else f"experiments/{name}"


@pytest.fixture
def controller(monkeypatch):
    fake = _FakeClient([_experiment("experiments/waiting", REASON),
                        _experiment("experiments/other")])
    monkeypatch.setattr(cli, "_client", lambda args: contextlib.nullcontext(fake))
    return fake


@pytest.mark.parametrize("command", [["status"], ["status", "experiments/waiting"]])
def test_status_says_why_an_experiment_waits(controller, command, capsys):
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert f"experiments/waiting waits: {REASON}" in " ".join(out.split())
    assert "experiments/other waits" not in out


def test_watch_says_why_an_experiment_waits(controller, capsys):
    assert cli.main(["watch", "waiting"]) == 1  # it ended PENDING, not SUCCEEDED
    out = " ".join(capsys.readouterr().out.split())
    assert f"waits: {REASON}" in out


def test_a_frame_without_a_reason_has_no_waits_line():
    console = Console(record=True, width=200)
    console.print(render(_experiment("experiments/other"), {}))
    assert "waits" not in console.export_text()
    console.print(render(_experiment("experiments/waiting", REASON), {}))
    assert f"waits: {REASON}" in console.export_text()


@pytest.fixture
def started_stack(monkeypatch, tmp_path):
    """`batchlab up` with Stack.up replaced: only what `up` prints afterwards is tested."""
    record = {"services": {"controller": {"address": "127.0.0.1:50051", "pid": 1,
                                          "log": str(tmp_path / "controller.log")}}}
    monkeypatch.setattr(stack_module.Stack, "up", lambda self, **kwargs: record)
    monkeypatch.setattr(stack_module.Stack, "read_record", lambda self: record)
    monkeypatch.delenv("BATCHLAB_CONTROLLER_ADDR", raising=False)
    return ["up", "--state-dir", str(tmp_path)]


def test_up_with_a_token_prints_how_clients_pass_it(started_stack, monkeypatch, capsys):
    monkeypatch.delenv("BATCHLAB_AUTH_TOKEN", raising=False)
    assert cli.main([*started_stack, "--token", "s3cret [x]"]) == 0
    out = capsys.readouterr().out
    assert "clients: export BATCHLAB_AUTH_TOKEN='s3cret [x]'" in out.splitlines()


def test_up_with_a_token_from_the_environment_names_the_variable_only(started_stack,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("BATCHLAB_AUTH_TOKEN", "from-env-token")
    assert cli.main(started_stack) == 0
    out = capsys.readouterr().out
    assert "from-env-token" not in out
    assert "$BATCHLAB_AUTH_TOKEN" in out


def test_up_without_a_token_says_nothing_of_tokens(started_stack, monkeypatch, capsys):
    monkeypatch.delenv("BATCHLAB_AUTH_TOKEN", raising=False)
    assert cli.main(started_stack) == 0
    assert "TOKEN" not in capsys.readouterr().out


def test_watch_without_a_terminal_prints_one_line_per_change():
    """A live view prints nothing to a pipe until the stream ends; a log reader sees lines."""
    from batchlab.client.watch import watch

    console = Console(record=True, width=300, force_terminal=False)
    first, second = _experiment("experiments/a"), _experiment("experiments/a", REASON)
    messages = [controller_pb2.WatchExperimentResponse(experiment=e) for e in (first, first, second)]
    assert watch(iter(messages), console=console) == second
    lines = console.export_text().splitlines()
    assert len(lines) == 2  # the repeated snapshot printed nothing
    assert lines[0].startswith("experiments/a ") and "waits" not in lines[0]
    assert lines[1].endswith(f"waits: {REASON}")


def test_a_failed_experiments_error_is_shown_in_the_view_and_the_lines():
    failed = _experiment("experiments/f")
    failed.state = controller_pb2.Experiment.FAILED
    failed.error = "runs were abandoned and the studies' budgets are not equal: missing x"
    console = Console(record=True, width=300)
    console.print(render(failed, {}))
    assert f"error: {failed.error}" in console.export_text()
    from batchlab.client.watch import summary_line

    assert summary_line(failed).endswith(f"; error: {failed.error}")


def test_watch_lines_show_the_best_target_metric_so_far_per_study():
    """A long trial changes no count; its evaluation points still move the best so far."""
    from batchlab.client.watch import watch

    exp = _experiment("experiments/b")
    study = exp.studies.add(name="experiments/b/studies/w.nesterov.b128")
    study.target.metric, study.target.goal = "validation/accuracy", 1  # MAXIMIZE

    def points(*values):
        return controller_pb2.WatchExperimentResponse(points=[controller_pb2.MetricPoint(
            trial=f"{study.name}/trials/0-r0", step=i + 1, values={"validation/accuracy": v})
            for i, v in enumerate(values)])

    messages = [controller_pb2.WatchExperimentResponse(experiment=exp), points(0.5),
                points(0.4), points(0.75, float("nan"))]
    console = Console(record=True, width=300, force_terminal=False)
    watch(iter(messages), console=console)
    lines = console.export_text().splitlines()
    assert len(lines) == 3  # a worse point changes nothing
    assert "best so far" not in lines[0]
    assert lines[1].endswith("; best so far: w.nesterov.b128 0.5")
    assert lines[2].endswith("; best so far: w.nesterov.b128 0.75")


@pytest.fixture
def recorded_up(started_stack, monkeypatch):
    """`batchlab up` with Stack.up recording its timeout and the addresses it would bind."""
    from batchlab.client.stack import SERVICES

    seen: dict = {}
    up = stack_module.Stack.up

    def record(self, **kwargs):
        seen.update(timeout=kwargs["timeout"],
                    addresses={s.name: self.address(s.name) for s in SERVICES})
        return up(self, **kwargs)  # the fixture's stand-in

    monkeypatch.setattr(stack_module.Stack, "up", record)
    monkeypatch.delenv("BATCHLAB_UP_TIMEOUT", raising=False)
    return started_stack, seen


def test_up_takes_the_host_ports_and_timeout_from_its_flags(recorded_up, monkeypatch):
    command, seen = recorded_up
    port, other = free_ports(2)
    monkeypatch.setenv("BATCHLAB_UP_TIMEOUT", "42")  # the flag wins
    assert cli.main([*command, "--host", "127.0.0.1", "--controller-port", str(port),
                     "--evaluator-port", str(other), "--timeout", "7.5"]) == 0
    assert seen["timeout"] == 7.5
    assert seen["addresses"]["controller"] == f"127.0.0.1:{port}"
    assert seen["addresses"]["evaluator"] == f"127.0.0.1:{other}"


@pytest.mark.parametrize("value, expected", [(None, 180.0), ("42", 42.0), (" 0.5 ", 0.5)])
def test_up_takes_its_timeout_from_the_environment(recorded_up, monkeypatch, value, expected):
    command, seen = recorded_up
    if value is not None:
        monkeypatch.setenv("BATCHLAB_UP_TIMEOUT", value)
    assert cli.main(command) == 0
    assert seen["timeout"] == expected


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf"])
def test_a_bad_timeout_is_refused_naming_where_it_came_from(recorded_up, monkeypatch, capsys,
                                                              value):
    command, seen = recorded_up
    monkeypatch.setenv("BATCHLAB_UP_TIMEOUT", value)
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert f"BATCHLAB_UP_TIMEOUT: expected a finite number of seconds > 0, got '{value}'" in err
    assert not seen  # nothing started
    monkeypatch.delenv("BATCHLAB_UP_TIMEOUT")
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--timeout", value])
    assert info.value.code == 2
    assert "--timeout: expected a finite number of seconds > 0" in capsys.readouterr().err
    assert not seen
    # Every command builds the same parser: the variable must not break the others.
    monkeypatch.setenv("BATCHLAB_UP_TIMEOUT", value)
    (port,) = free_ports(1)
    assert cli.main(["status", "--controller", f"127.0.0.1:{port}"]) == 1
    assert "cannot reach the controller" in capsys.readouterr().err
