"""The benchmark scripts stay runnable: each imports what it measures and parses its options."""

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
