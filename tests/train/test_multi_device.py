"""Data parallelism: 8 simulated CPU devices train the same run as one device does.

The device count is fixed when JAX starts, so the comparison runs in a subprocess
(multi_device_worker.py) started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multi_device_worker.py")


@pytest.fixture(scope="module")
def report(data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multi_device") / "report.json"
    env = {
        **os.environ,
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(data_dir), str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


pytestmark = pytest.mark.slow


def test_eight_devices_are_used(report):
    assert report["device_count"] == 8
    assert report["params_on_devices"] == [8]  # replicated on every device
    assert report["virtual_batches"]["devices_holding_input"] == 8
    assert report["outcomes"] == ["SUCCEEDED", "SUCCEEDED"], report["errors"]
    assert report["steps"] == [6, 6]


def test_eight_devices_match_one_device(report):
    # Same global program; only the order of floating-point sums differs.
    for part in ("params", "batch_stats", "opt_state"):
        assert report[part]["leaves"] > 0
        assert report[part]["max_excess"] <= 0, (part, report[part])
    assert report["curve_steps"] == [[3.0, 6.0], [3.0, 6.0]]
    assert report["curve_max_abs"] < 1e-4  # eval batches of 500 are padded to 504 on 8 devices


def test_virtual_batches_are_consecutive_sub_batches_on_their_devices(report):
    checks = report["virtual_batches"]
    assert checks["vs_sub_batches"] < 1e-5
    assert checks["vs_whole_batch"] > 1e-3  # the check can tell the two apart (about 1e-2)


def test_per_device_batch_must_be_a_multiple_of_the_virtual_batch(report):
    message = report["error_not_multiple_of_virtual_batch"]
    assert message is not None and message.startswith("batch_size:")
    assert "per-device batch 8" in message and "virtual_batch_size 16" in message
    message = report["error_not_divisible_by_devices"]
    assert message is not None and message.startswith("batch_size:") and "8 devices" in message


def test_microbatches_on_eight_devices_match_one_pass_on_one_device(report):
    # Each device runs its own slice of each microbatch: the virtual batches, the gradient and
    # the one running-statistics update are those of one pass over the batch.
    checks = report["microbatches"]
    assert checks["outcomes"] == ["SUCCEEDED", "SUCCEEDED"]
    for part in ("params", "batch_stats"):
        assert checks[part]["leaves"] > 0
        assert checks[part]["max_excess"] <= 0, (part, checks[part])
    assert checks["curve_max_abs"] < 1e-4
    message = checks["error_microbatch_cuts_virtual_batches"]
    assert message is not None and message.startswith("workload.microbatch_size:"), message
    assert "per-device batch 8" in message and "virtual_batch_size 16" in message
