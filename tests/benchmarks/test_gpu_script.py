"""benchmarks/gpu.sh end to end on the CPU: the smoke sizes through the real script, every section
measured and written with finite numbers, nothing written to benchmarks/results/."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[2]
# ResNet-50 v1.5: 25,557,032 parameters and about 4.1 G multiply-adds per 224 px image forward.
# At 32 px every layer's output has 1/49 of the positions (224 = 7 x 32 and every stride divides),
# and a training step is about three forward passes (forward, then two products per layer backward).
RESNET50_PARAMS = 25_557_032
RESNET50_FORWARD_MACS_224 = 4.1e9

HEADINGS = (
    "## ResNet-50 v1.5 training, bfloat16",
    "## BERT pretraining phase 1 (sequence 128), bfloat16",
    "## Model FLOP utilisation",
    "## Optimizer update times",
    "## Vectorised lanes: K runs as one vmapped train step",
    "## Host input pipeline: MLPerf ImageNet training preprocessing on mock JPEGs",
)


def _finite_positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run of the script (about a minute on an idle 2-core machine; compile-bound)."""
    out = tmp_path_factory.mktemp("gpu_bench")
    results = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu-*")}
    env = {**os.environ, "BATCHLAB_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    # A generous budget: the smoke sizes take about a minute on an idle 2-core machine, and a
    # loaded one must not turn the test into a budget-skip.
    proc = subprocess.run(
        [
            str(REPO / "benchmarks" / "gpu.sh"),
            "--device",
            "cpu",
            "--mode",
            "smoke",
            "--out",
            str(out),
            "--budget-s",
            "1500",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu-*")}
    return proc, out, before, after


@pytest.mark.slow
def test_the_script_succeeds_and_leaves_benchmarks_results_alone(smoke_run):
    proc, out, before, after = smoke_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-cpu.json", "gpu-cpu.md"]
    assert before == after


@pytest.mark.slow
def test_every_section_is_measured_with_finite_numbers(smoke_run):
    _, out, _, _ = smoke_run
    result = json.loads((out / "gpu-cpu.json").read_text())
    assert result["mode"] == "smoke" and result["device"]["device_kind"] == "cpu"
    assert result["device"]["nvidia_smi"] is None
    sections = result["sections"]
    assert set(sections) == set(gpu.SECTIONS)
    for name, section in sections.items():
        assert "error" not in section and "skipped" not in section, (name, section)

    resnet = sections["resnet50"]
    assert resnet["parameters"] == RESNET50_PARAMS
    assert resnet["loss_finite"]
    for key in ("compile_s", "step_s", "images_per_s", "flops_per_step"):
        assert _finite_positive(resnet[key]), key
    # XLA's count of the compiled step against the published forward cost: convolutions forward
    # and backward, plus BN, the loss and the LARS update (a large share at batch 2).
    scale = (resnet["image_size"] / 224) ** 2
    expected = 3 * 2 * RESNET50_FORWARD_MACS_224 * scale * resnet["batch_per_device"]
    assert 0.9 * expected < resnet["flops_per_step"] < 1.8 * expected

    bert = sections["bert"]
    assert bert["seq_length"] == 128 and bert["max_predictions"] == 20 and bert["loss_finite"]
    for key in ("compile_s", "step_s", "sequences_per_s", "flops_per_step"):
        assert _finite_positive(bert[key]), key

    mfu = sections["mfu"]
    assert _finite_positive(mfu["peak_flops"]) and "measured" in mfu["peak_source"]
    assert len(mfu["rows"]) == 2 and all(_finite_positive(r["mfu"]) for r in mfu["rows"])

    updates = sections["optimizers"]
    assert {o["optimizer"] for o in updates["optimizers"]} == set(gpu.optimizers.OPTIMIZERS)
    assert all(_finite_positive(r["median_ms"]) for r in updates["rows"])

    lanes = sections["lanes"]
    assert [r["k"] for r in lanes["rows"]] == list(gpu.MODES["smoke"].lanes)
    assert all(_finite_positive(r["examples_per_s"]) and r["loss_finite"] for r in lanes["rows"])

    pipeline = sections["input_pipeline"]
    assert pipeline["output_shape"] == [224, 224, 3] and pipeline["output_dtype"] == "float32"
    assert _finite_positive(pipeline["max_images_per_s"])
    assert [r["workers"] for r in pipeline["rows"]] == sorted({1, os.cpu_count() or 1})


@pytest.mark.slow
def test_the_markdown_has_every_section_and_no_gaps(smoke_run):
    proc, out, _, _ = smoke_run
    md = (out / "gpu-cpu.md").read_text()
    assert md.startswith("# GPU benchmark: cpu")
    for heading in HEADINGS:
        assert heading in md
    for gap in ("FAILED", "skipped", "not measured", "nan", "n/a (ResNet-50"):
        assert gap not in md, gap
    # The one n/a allowed: optax has no Adam without bias correction to compare with.
    assert md.count("| n/a |") == 1 and "| adam (BERT, no bias correction) |" in md
    assert "Can this host feed the devices at the measured ResNet-50 rate?" in md
    assert md in proc.stdout  # the script prints what it wrote


def test_mock_jpegs_are_imagenet_sized_jpegs():
    import io

    from PIL import Image

    jpegs = gpu.mock_jpegs(4, seed=1)
    assert len(set(jpegs)) == 4
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"
            h, w = image.height, image.width
        assert (
            gpu.MOCK_HEIGHTS[0] <= h < gpu.MOCK_HEIGHTS[1]
            and gpu.MOCK_WIDTHS[0] <= w < gpu.MOCK_WIDTHS[1]
        )
        # Photographs of this size are tens of KiB as JPEG; noise would be hundreds, flat colour ~5.
        assert 15_000 < len(data) < 200_000
