"""When the controller cannot be reached, every client command says so in one line, with the
address it tried and the way out, not gRPC's raw text (issue 9, part 5)."""

from __future__ import annotations

import pytest

from batchlab.cli import main
from batchlab.rpc.client import free_ports

COMMANDS = [
    ["status"],
    ["status", "experiments/abc"],
    ["watch", "abc"],
    ["cancel", "experiments/abc"],
    ["report", "experiments/abc"],
    ["submit", "experiments/examples/minimal.yaml"],
    ["submit", "experiments/examples/minimal.yaml", "--validate-only"],
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_closed_port_is_reported_with_the_address_and_the_way_out(command, capsys):
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    assert main([*command, "--controller", address]) == 1
    line = _one_error_line(capsys)
    assert line == (f"error: cannot reach the controller at {address} (connection refused): "
                    "start the embedded stack with `batchlab up`, or point "
                    "BATCHLAB_CONTROLLER_ADDR (or --controller) at a running controller")


def test_the_address_from_the_environment_is_the_one_named(capsys, monkeypatch):
    monkeypatch.setenv("BATCHLAB_CONTROLLER_ADDR", "no-such-host.invalid:50051")
    assert main(["status"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot reach the controller at no-such-host.invalid:50051 "
                           "(its host name does not resolve): start the embedded stack")


def test_another_service_at_the_address_is_named_as_not_the_controller(capsys):
    from batchlab.rpc.server import build_server

    server = build_server([], host="127.0.0.1", port=0)  # answers (health), no ExperimentService
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        assert main(["status", "--controller", address]) == 1
    finally:
        server.stop(grace=0)
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {address} answers but is not the batchlab controller "
                           "(UNIMPLEMENTED: ")
    assert line.endswith("point BATCHLAB_CONTROLLER_ADDR (or --controller) at the controller, "
                         "not another batchlab service")
