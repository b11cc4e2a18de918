"""diffalign's trainer against the real diffusers Diffusion-DPO example, both run unchanged as subprocesses.

The example is ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` of the diffusers repository:
the user's own copy, never shipped here. Both train the same job: the toy pipeline (assets/toy-t2i) on its pairs
(assets/toy-t2i/data/train.parquet, already in the example's columns: caption, jpg_0, jpg_1, label_0), 32 px,
LoRA rank 16 on to_k/to_q/to_v/to_out.0, 4 pairs per step, β 5000 (the example's β' = β/2 = 2500), lr 5e-4
constant, AdamW (weight decay 1e-2), clipping at 1, no flips, fp32, one thread each, no validation, no checkpoint
before the end, and each program's default logging (the example logs every step, diffalign every 10).
diffalign runs its default path: the latent cache, built by an untimed run first.

A run's wall time includes start-up, model loading and the final save; they cancel in the step time
``(t(long) − t(short)) / (long − short)`` (60 and 15 steps). The runs alternate (example, ours, example, ours,
the order reversed every round) so that a change of the machine's load hits both alike.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "assets" / "toy-t2i"
RESOLUTION, RANK, PAIRS_PER_STEP, BETA, LR = 32, 16, 4, 5000.0, 5e-4
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class StepTimes:
    """Per-step seconds of each program, one value per round."""

    example: list[float]
    diffalign: list[float]

    @property
    def ratios(self) -> list[float]:
        return [ours / theirs for ours, theirs in zip(self.diffalign, self.example)]


def one_thread_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }


def example_command(script: Path, work: Path, steps: int, output_dir: Path) -> list[str]:
    return [
        sys.executable, str(script),
        "--pretrained_model_name_or_path", str(TOY),
        "--dataset_name", str(work / "data"), "--dataset_split_name", "train", "--cache_dir", str(work / "hf"),
        "--resolution", str(RESOLUTION), "--no_hflip", "--rank", str(RANK),
        "--train_batch_size", str(PAIRS_PER_STEP), "--beta_dpo", str(int(BETA / 2)),
        "--learning_rate", str(LR), "--lr_scheduler", "constant", "--max_grad_norm", "1.0",
        "--mixed_precision", "no", "--seed", "0", "--max_train_steps", str(steps),
        "--checkpointing_steps", "1000000000", "--output_dir", str(output_dir),
    ]  # fmt: skip


def diffalign_config(work: Path) -> Path:
    config = {
        "kind": "diffusion",
        "model": {
            "pretrained": str(TOY),
            "trainable": "lora",
            "lora": {"rank": RANK, "target_modules": LORA_TARGETS},
        },
        "data": {
            "source": str(work / "data" / "train.parquet"),
            "resolution": RESOLUTION,
            "random_flip": False,
            "caption_dropout": 0.0,
            "cache_dir": str(work / "latent-cache"),
        },
        "loss": {"type": ["sigmoid"], "beta": BETA},
        "optim": {"lr": LR, "scheduler": "constant", "max_grad_norm": 1.0},
        "run": {"batch_size": PAIRS_PER_STEP, "mixed_precision": "no", "checkpoint_every": 1_000_000_000},
    }
    path = work / "diffalign.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def diffalign_command(config: Path, steps: int, output_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "diffalign", "train", str(config),
        f"run.max_steps={steps}", f"run.output_dir={output_dir}",
    ]  # fmt: skip


def timed_run(command: list[str], output_dir: Path, log: Path) -> float:
    """Wall seconds of one fresh run (its output folder removed first, so nothing resumes)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, env=one_thread_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}); its log ends:\n{tail}")
    return seconds


def measure_against(script: Path, rounds: int, short: int = 15, long: int = 60) -> StepTimes:
    """Per-step times of the example at ``script`` and of diffalign's default step, ``rounds`` times each."""
    if not script.is_file():
        raise FileNotFoundError(
            f"--against {script}: no such file; take examples/research_projects/diffusion_dpo/"
            "train_diffusion_dpo.py from a diffusers checkout"
        )
    with tempfile.TemporaryDirectory(prefix="diffalign-against-") as folder:
        work = Path(folder)
        (work / "data").mkdir()
        shutil.copy(TOY / "data" / "train.parquet", work / "data" / "train.parquet")
        config = diffalign_config(work)
        print("  building diffalign's latent cache (untimed)", flush=True)
        timed_run(diffalign_command(config, 1, work / "ours"), work / "ours", work / "build.log")
        programs = {
            "example": lambda steps: timed_run(
                example_command(script, work, steps, work / "theirs"), work / "theirs", work / "example.log"
            ),
            "diffalign": lambda steps: timed_run(
                diffalign_command(config, steps, work / "ours"), work / "ours", work / "diffalign.log"
            ),
        }
        times = StepTimes(example=[], diffalign=[])
        for round_number in range(rounds):
            order = list(programs) if round_number % 2 == 0 else list(programs)[::-1]
            seconds: dict[str, dict[int, float]] = {name: {} for name in programs}
            for steps in (short, long):
                for name in order:
                    seconds[name][steps] = programs[name](steps)
            for name in programs:
                step = (seconds[name][long] - seconds[name][short]) / (long - short)
                getattr(times, name).append(step)
                print(
                    f"  round {round_number + 1} {name}: {seconds[name][short]:.1f} s ({short} steps), "
                    f"{seconds[name][long]:.1f} s ({long} steps) → {1000 * step:.1f} ms/step",
                    flush=True,
                )
    return times


def print_against(times: StepTimes, baseline_seconds: float | None, script: Path) -> list[dict]:
    """The table: diffalign's default step against the real example, the re-implementation as a second row."""
    example = statistics.median(times.example)
    rows = [
        {"step": "diffusers example (real script)", "seconds": example, "ratio": 1.0},
        {
            "step": "diffalign default (cache built)",
            "seconds": statistics.median(times.diffalign),
            "ratio": statistics.median(times.ratios),
        },
    ]
    if baseline_seconds is not None:
        rows.append(
            {
                "step": "re-implemented baseline¹",
                "seconds": baseline_seconds,
                "ratio": baseline_seconds / example,
            }
        )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\nDiffusion-DPO step against {script} (toy-t2i, {RESOLUTION} px, LoRA rank {RANK}, "
        f"{PAIRS_PER_STEP} pairs/step, β {BETA:g}, fp32 CPU, 1 thread each); load average now {load}"
    )
    header = f"{'step':<34} {'ms/step':>9} {'time vs example':>16}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['step']:<34} {1000 * row['seconds']:>9.1f} {row['ratio']:>15.2f}×")
    ratios = ", ".join(f"{ratio:.2f}" for ratio in times.ratios)
    print(f"median of {len(times.ratios)} rounds; diffalign/example per round: {ratios}")
    if baseline_seconds is not None:
        print(
            "¹ this script's own re-implementation of the example's step, timed in-process on the same models"
        )
    return rows
