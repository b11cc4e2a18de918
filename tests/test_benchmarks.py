"""The benchmark scripts stay runnable: each imports what it measures and parses its options."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"common.py", "real_example.py"}  # modules the scripts import, not scripts


@pytest.mark.parametrize(
    "script", sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name not in HELPERS)
)
def test_a_benchmark_script_imports_and_prints_its_help(script):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_the_rollout_benchmark_finds_our_samplers_equal_to_the_stock_pipeline(tmp_path):
    record = tmp_path / "rollout.json"
    command = [sys.executable, str(BENCHMARKS / "rollout.py"), "--threads", "1", "--rounds", "1"]
    command += ["--batch-size", "2", "--steps", "3", "--json", str(record)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(record.read_text())["rows"]
    samplers = {(row["model"], row["sampler"]) for row in rows}
    assert samplers == {
        ("toy-t2i", "pipeline"),
        ("toy-t2i", "sample_latents"),
        ("toy-t2i-flow", "pipeline"),
        ("toy-t2i-flow", "sample_latents"),
        ("toy-t2i-flow", "sample_trajectory (SDE)"),
    }
    for row in rows:
        assert row["samples_per_s"] > 0
        if "SDE" not in row["sampler"]:  # the same generators, the same latents, to fp32 rounding
            # (ours encodes the empty and the real prompts in one batch, the pipeline in two)
            assert row["max_abs_difference"] < 1e-4, row
