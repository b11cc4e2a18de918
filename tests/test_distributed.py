"""Two processes (gloo on CPU) equal one process with the same global batch.

`accelerate launch --cpu` runs a single process, so the processes are started with torchrun, which
accelerate picks up from the environment exactly as on a multi-GPU machine.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_diffusion_trainer import png
from tiny_pipelines import build_tiny_sd

pytestmark = pytest.mark.slow


def write_config(directory: Path, model: Path, data: Path, output: Path, **run) -> Path:
    run_settings = {
        "output_dir": str(output),
        "max_steps": 4,
        "batch_size": 2,
        "log_every": 1,
        "checkpoint_every": 2,
        "trackers": [],
        "progress_bar": False,
        "mixed_precision": "no",
        **run,
    }
    config = {
        "kind": "diffusion",
        "model": {"pretrained": str(model), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"source": str(data), "resolution": 16, "cache_dir": str(directory / "cache")},
        "loss": {"type": ["sigmoid"], "beta": 50.0},  # β scales fp32 rounding of the MSEs into the loss
        # eps far above every |gradient| makes Adam plain SGD (lr/eps = 0.1): Adam's 1/√v would otherwise blow
        # the all-reduce's fp32 rounding in near-zero gradients up to lr-sized steps.
        "optim": {"lr": 100.0, "eps": 1000.0, "warmup_steps": 0, "scheduler": "constant"},
        "run": run_settings,
    }
    path = output.with_suffix(".json")  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def launch(config: Path, processes: int) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        "29617",
        "-m",
        "diffalign",
        "train",
        str(config),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    table = {
        "caption": ["a red circle", "a blue square"] * 8,
        "jpg_0": [png(rng) for _ in range(16)],
        "jpg_1": [png(rng) for _ in range(16)],
        "label_0": [1.0, 0.0] * 8,
    }
    pq.write_table(pa.table(table), root / "pairs.parquet")
    return root, build_tiny_sd(root / "model"), root / "pairs.parquet"


def test_two_processes_match_one_process_and_resume_under_one(setup):
    root, model, data = setup
    single = root / "single"
    launch(write_config(root, model, data, single), processes=1)
    double = root / "double"  # 1 pair per process × 2 processes = the same global batch of 2
    launch(write_config(root, model, data, double, batch_size=1), processes=2)
    reference = losses(single)
    assert sorted(reference) == [1, 2, 3, 4] and len(set(reference.values())) > 1
    assert losses(double) == pytest.approx(reference, abs=1e-5)

    # Stop a 2-process run after 2 steps, finish it on 1 process: the trajectory stays the same.
    switched = root / "switched"
    launch(write_config(root, model, data, switched, batch_size=1, max_steps=2), processes=2)
    launch(write_config(root, model, data, switched, resume="latest"), processes=1)
    assert losses(switched) == pytest.approx(reference, abs=1e-5)
