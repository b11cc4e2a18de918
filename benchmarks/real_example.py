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
the order reversed every round) so that a change of the machine's load hits both alike. Each run's CPU time
(user + system, from the kernel's accounting of the child) is taken the same way: with one thread each it equals
the wall time on an idle machine and is far steadier on a shared one.
"""

from __future__ import annotations

import os
import resource
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
    """Per-step seconds of each program, one value per round: wall clock, and the process's CPU time (user +
    system), which another process's load on a shared machine disturbs far less than the wall clock."""

    example: list[float]
    diffalign: list[float]
    example_cpu: list[float]
    diffalign_cpu: list[float]

    @property
    def ratios(self) -> list[float]:
        return [ours / theirs for ours, theirs in zip(self.diffalign, self.example)]

    @property
    def cpu_ratios(self) -> list[float]:
        return [ours / theirs for ours, theirs in zip(self.diffalign_cpu, self.example_cpu)]


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


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(command: list[str], output_dir: Path, log: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh run (its output folder removed first, so nothing resumes)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    start, start_cpu = time.perf_counter(), children_cpu_seconds()
    with log.open("w") as out:
        result = subprocess.run(command, env=one_thread_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start, children_cpu_seconds() - start_cpu
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
        times = StepTimes(example=[], diffalign=[], example_cpu=[], diffalign_cpu=[])
        for round_number in range(rounds):
            order = list(programs) if round_number % 2 == 0 else list(programs)[::-1]
            seconds: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in programs}
            for steps in (short, long):
                for name in order:
                    seconds[name][steps] = programs[name](steps)
            for name in programs:
                (wall_short, cpu_short), (wall_long, cpu_long) = seconds[name][short], seconds[name][long]
                step, cpu_step = (
                    (wall_long - wall_short) / (long - short),
                    (cpu_long - cpu_short) / (long - short),
                )
                getattr(times, name).append(step)
                getattr(times, f"{name}_cpu").append(cpu_step)
                print(
                    f"  round {round_number + 1} {name}: {wall_short:.1f} s ({short} steps), {wall_long:.1f} s "
                    f"({long} steps) → {1000 * step:.1f} ms/step wall, {1000 * cpu_step:.1f} ms/step CPU",
                    flush=True,
                )
    return times


def print_against(times: StepTimes, baseline_seconds: float | None, script: Path) -> list[dict]:
    """The table: diffalign's default step against the real example, the re-implementation as a second row."""
    median = statistics.median
    example, example_cpu = median(times.example), median(times.example_cpu)
    rows = [
        {"step": "diffusers example (real script)", "seconds": example, "ratio": 1.0,
         "cpu_seconds": example_cpu, "cpu_ratio": 1.0},
        {"step": "diffalign default (cache built)", "seconds": median(times.diffalign),
         "ratio": median(times.ratios), "cpu_seconds": median(times.diffalign_cpu),
         "cpu_ratio": median(times.cpu_ratios)},
    ]  # fmt: skip
    if baseline_seconds is not None:
        rows.append(
            {"step": "re-implemented baseline¹", "seconds": baseline_seconds, "ratio": baseline_seconds / example}
        )  # fmt: skip
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\nDiffusion-DPO step against {script} (toy-t2i, {RESOLUTION} px, LoRA rank {RANK}, "
        f"{PAIRS_PER_STEP} pairs/step, β {BETA:g}, fp32 CPU, 1 thread each); load average now {load}"
    )
    header = f"{'step':<34} {'ms/step':>9} {'vs example':>11} {'CPU ms/step':>12} {'vs example':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        cpu = (
            f"{1000 * row['cpu_seconds']:>12.1f} {row['cpu_ratio']:>10.2f}×"
            if "cpu_seconds" in row
            else f"{'':>24}"
        )
        print(f"{row['step']:<34} {1000 * row['seconds']:>9.1f} {row['ratio']:>10.2f}× {cpu}")
    wall = ", ".join(f"{ratio:.2f}" for ratio in times.ratios)
    cpu_ratios = ", ".join(f"{ratio:.2f}" for ratio in times.cpu_ratios)
    print(
        f"medians of {len(times.ratios)} rounds; diffalign/example per round: wall {wall}; CPU {cpu_ratios}"
    )
    if baseline_seconds is not None:
        print(
            "¹ this script's re-implementation of the example's step, timed in-process (wall) on the same models"
        )
    return rows
