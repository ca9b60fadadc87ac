"""Starting a local Ray on a busy machine (issue 9, part 5): a node start that times out is
tried again, whatever the case of Ray's message ("Timed out waiting for file
.../gcs_server_port" was not retried before), and running out of attempts says so."""

from __future__ import annotations

import os
import types

import pytest
import ray

from batchlab.runner.local_ray import RayStartTimeout, ensure_local_ray

GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/logs/gcs_server_port_abc. See logs"


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init fails with the queued errors, then succeeds; records the calls."""
    calls = {"init": 0, "shutdown": 0, "errors": []}

    def init(**kwargs):
        calls["init"] += 1
        calls["kwargs"] = kwargs
        calls.setdefault("gcs_wait", []).append(os.environ.get("RAY_gcs_server_port_wait_time_s"))
        if calls["errors"]:
            raise calls["errors"].pop(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__(
        "shutdown", calls["shutdown"] + 1))
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: types.SimpleNamespace(gcs_address="127.0.0.1:6379"))
    return calls


def test_a_gcs_timeout_is_tried_again(fake_ray):
    fake_ray["errors"] = [Exception(GCS_TIMEOUT), Exception("The current node timed out "
                                                            "during startup")]
    assert ensure_local_ray(attempts=3) == "127.0.0.1:6379"
    assert fake_ray["init"] == 3 and fake_ray["shutdown"] == 2


@pytest.mark.parametrize("operator_wait", [None, "300"])
def test_each_attempt_bounds_its_wait_for_the_gcs_and_an_operators_setting_wins(
        fake_ray, monkeypatch, operator_wait):
    """A start whose GCS stalls gives up after 20 s, not Ray's 30 s or 120 s: the next try
    is the one that works (later tries wait longer, for a machine that is only busy)."""
    if operator_wait is None:
        monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    else:
        monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", operator_wait)
    fake_ray["errors"] = [Exception(GCS_TIMEOUT)] * 3
    ensure_local_ray(attempts=4)
    expected = ["20", "60", "120", "120"] if operator_wait is None else [operator_wait] * 4
    assert fake_ray["gcs_wait"] == expected
    assert os.environ.get("RAY_gcs_server_port_wait_time_s") == operator_wait  # as it was


def test_running_out_of_attempts_says_so(fake_ray):
    fake_ray["errors"] = [Exception(GCS_TIMEOUT)] * 3
    with pytest.raises(RayStartTimeout) as info:
        ensure_local_ray(attempts=3)
    assert "did not start in 3 attempts" in str(info.value)
    assert "gcs_server_port" in str(info.value)


def test_other_failures_are_not_retried(fake_ray):
    fake_ray["errors"] = [ValueError("num_cpus must be positive")]
    with pytest.raises(ValueError):
        ensure_local_ray(attempts=3)
    assert fake_ray["init"] == 1


@pytest.mark.parametrize("long_tmpdir", [True, False])
def test_a_long_tmpdir_gets_ray_a_short_session_folder(fake_ray, monkeypatch, tmp_path,
                                                      long_tmpdir):
    """Ray's sockets live under its session folder (a unix socket path is at most 107 bytes):
    under xdist's longer TMPDIR the controller's ray.init failed forever."""
    import shutil
    import tempfile

    folder = tmp_path / ("x" * 80) if long_tmpdir else tempfile.mkdtemp(dir="/tmp", prefix="s")
    os.makedirs(folder, exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    try:
        ensure_local_ray(attempts=1)
    finally:
        if not long_tmpdir:
            shutil.rmtree(folder)
    given = fake_ray["kwargs"].get("_temp_dir")
    if long_tmpdir:
        assert given.startswith("/tmp/bl-ray-") and len(given) < 36
        shutil.rmtree(given)
    else:
        assert given is None
