"""Two processes (gloo on CPU) equal one process with the same global batch, and resume under one.

`accelerate launch --cpu` runs a single process, so the processes are started with torchrun, which
accelerate picks up from the environment exactly as on a multi-GPU machine. The batch-level losses (AOT's sort)
and KTO's reference point z0 need every process's samples (diffalign/training/distributed.py); the FSDP2 test
shards a tiny model with torch's fully_shard on CPU (accelerate 1.15 sets up FSDP only on accelerators).
"""

import copy
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsdp_worker import make_optimizer, make_policy, probe, train_steps
from helpers import quiet_run, random_png, torchrun
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_llm, build_tiny_sd

from diffalign.toy.llm import train_tokenizer

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def write_config(directory: Path, model: Path, data: Path, output: Path, data_settings: dict | None = None, **run) -> Path:
    config = {
        "kind": "diffusion",
        "model": {"pretrained": str(model), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"source": str(data), "resolution": 16, "cache_dir": str(directory / "cache"), **(data_settings or {})},
        # β scales the fp32 rounding of the MSEs into the loss (1 and 2 processes differ by it), and the step size
        # lr·β/eps must stay small enough that the loss never explodes, which would amplify that rounding: at
        # β = 100, lr = 50 the losses move by ~1e-2 over 9 steps while the processes agree to ~5e-6. eps far above
        # every |gradient| makes Adam plain SGD: its 1/√v would blow the all-reduce's rounding in near-zero
        # gradients up to lr-sized steps. No weight decay: AdamW's decoupled decay scales the LoRA by 1 − lr·wd
        # per step, which at these learning rates wipes it out (or flips and grows it).
        "loss": {"type": ["sigmoid"], "beta": 100.0},
        "optim": {"lr": 50.0, "eps": 1000.0, "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": 0.3},
        "run": quiet_run(output, **{"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, **run}),
    }
    path = output.with_suffix(".json")  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def launch(config: Path, processes: int) -> None:
    torchrun(processes, "-m", "diffalign", "train", str(config))


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    table = {
        "caption": ["a red circle", "a blue square"] * 8,
        "jpg_0": [random_png(rng) for _ in range(16)],
        "jpg_1": [random_png(rng) for _ in range(16)],
        "label_0": [1.0, 0.0] * 8,
    }
    pq.write_table(pa.table(table), root / "pairs.parquet")
    # A streamed source of two shards (read in a seeded order) holding 14 of the pairs: 7 steps an epoch.
    (root / "shards").mkdir()
    pq.write_table(pa.table({key: values[:8] for key, values in table.items()}), root / "shards" / "train-0.parquet")
    pq.write_table(pa.table({key: values[8:14] for key, values in table.items()}), root / "shards" / "train-1.parquet")
    return root, build_tiny_sd(root / "model"), root / "pairs.parquet"


@pytest.mark.slow(minutes=1)
def test_two_processes_match_one_process_and_resume_under_one(setup):
    root, model, data = setup
    single = root / "single"
    launch(write_config(root, model, data, single), processes=1)
    double = root / "double"  # 1 pair per process × 2 processes = the same global batch of 2
    launch(write_config(root, model, data, double, batch_size=1), processes=2)
    reference = losses(single)
    assert sorted(reference) == [1, 2, 3, 4] and max(reference.values()) - min(reference.values()) > 1e-3
    assert losses(double) == pytest.approx(reference, abs=1e-5)

    # Stop a 2-process run after 2 steps, finish it on 1 process: the trajectory stays the same.
    switched = root / "switched"
    launch(write_config(root, model, data, switched, batch_size=1, max_steps=2), processes=2)
    launch(write_config(root, model, data, switched, resume="latest"), processes=1)
    assert losses(switched) == pytest.approx(reference, abs=1e-5)


def cache_entries(cache_dir: Path) -> dict[str, torch.Tensor]:
    entries = {}
    for path in sorted((cache_dir / "images").glob("*.safetensors")):
        entries.update(load_file(path))
    return entries


def test_two_processes_build_the_cache_one_process_builds(setup):
    """Each process encodes the images whose content key falls to it, into shards of its own; together they hold
    every entry of a 1-process build, with the same values."""
    root, model, data = setup
    single, double = root / "cache-of-1", root / "cache-of-2"
    launch(write_config(root, model, data, root / "cache-run-1", {"cache_dir": str(single)}, max_steps=1), processes=1)
    launch(write_config(root, model, data, root / "cache-run-2", {"cache_dir": str(double)}, max_steps=1), processes=2)
    assert len(list((single / "images").glob("*.safetensors"))) == 1
    assert len(list((double / "images").glob("*.safetensors"))) == 2
    one, two = cache_entries(single), cache_entries(double)
    assert sorted(one) == sorted(two) and len(one) == 32 * 2 * 4  # images × views × (mean, std, 2 sizes)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)


# --- streamed data: 2 processes equal 1 with the global batch; kill -9 mid-epoch, then an exact resume --------

STREAMED = {"streaming": True, "shuffle_buffer": 5, "cache_dir": None}


@pytest.fixture(scope="module")
def streamed_single(setup):
    """1 process × 2 pairs over 9 steps: past the end of the first epoch (7 steps of the 14 streamed pairs)."""
    root, model, _ = setup
    output = root / "streamed-single"
    launch(write_config(root, model, root / "shards", output, STREAMED, max_steps=9), processes=1)
    return output


def test_a_streamed_run_on_two_processes_matches_one_and_resumes_under_one(setup, streamed_single):
    root, model, _ = setup
    reference = losses(streamed_single)
    assert sorted(reference) == list(range(1, 10)) and max(reference.values()) - min(reference.values()) > 1e-3
    double = root / "streamed-double"
    launch(write_config(root, model, root / "shards", double, STREAMED, batch_size=1, max_steps=9), processes=2)
    assert losses(double) == pytest.approx(reference, abs=1e-5)
    switched = root / "streamed-switched"  # 3 steps on 2 processes (checkpoint at 2 and 3), the rest on 1
    launch(write_config(root, model, root / "shards", switched, STREAMED, batch_size=1, max_steps=3), processes=2)
    launch(write_config(root, model, root / "shards", switched, STREAMED, max_steps=9, resume="latest"), processes=1)
    assert losses(switched) == pytest.approx(reference, abs=1e-5)


def kill_after_first_checkpoint(config: Path, output: Path) -> None:
    """Start a run that would go on for long, and SIGKILL it once its step-2 checkpoint is on disk."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffalign", "train", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (output / "checkpoints" / "step-0000002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.mark.parametrize("streaming", [False, True])
def test_kill_9_mid_epoch_then_resume_latest_is_bitwise_identical(setup, streamed_single, streaming):
    """A SIGKILL leaves no emergency checkpoint: the run resumes from its last periodic one, mid-epoch, and
    ends exactly where the uninterrupted run ends (both runs cross an epoch's end)."""
    root, model, data = setup
    settings, source, steps = (STREAMED, root / "shards", 9) if streaming else ({"cache_dir": None}, data, 10)
    if streaming:
        uninterrupted = streamed_single
    else:
        uninterrupted = root / "loaded-single"
        launch(write_config(root, model, source, uninterrupted, settings, max_steps=steps), processes=1)
    killed = root / f"killed-{streaming}"
    kill_after_first_checkpoint(write_config(root, model, source, killed, settings, max_steps=10_000), killed)
    assert not (killed / "final").exists()
    launch(write_config(root, model, source, killed, settings, max_steps=steps, resume="latest"), processes=1)
    assert losses(killed) == losses(uninterrupted)  # the resumed run's records come last: exact equality
    last = f"checkpoints/step-{steps:07d}/trainable.safetensors"
    assert (killed / last).read_bytes() == (uninterrupted / last).read_bytes()


# --- LLM: AOT's sort and KTO's z0 over every process; a 2-process checkpoint resumed under 1 ----------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A random two-layer Llama with a small byte-level BPE tokenizer; paired and unpaired (KTO) data for it."""
    root = tmp_path_factory.mktemp("llm")
    rng = random.Random(0)
    words = ["red", "blue", "green", "white", "circle", "square", "star", "line"]
    prompts = [f"draw a {rng.choice(words[:4])} {rng.choice(words[4:])} number {i}" for i in range(16)]
    answers = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(32)]
    paired = [{"prompt": p, "chosen": answers[2 * i], "rejected": answers[2 * i + 1]} for i, p in enumerate(prompts)]
    unpaired = [{"prompt": p, "completion": answers[i], "label": i % 2 == 0} for i, p in enumerate(prompts)]
    build_tiny_llm(root / "model", train_tokenizer(prompts + answers, vocab_size=320))
    return root / "model", write_jsonl(root / "paired.jsonl", paired), write_jsonl(root / "unpaired.jsonl", unpaired)


def write_llm_config(model: Path, data: Path, output: Path, loss: str, **run) -> Path:
    config = {
        "kind": "llm",
        "model": {"pretrained": str(model), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"path": str(data), "max_prompt_length": 32, "max_length": 64},
        "loss": {"type": [loss], "beta": 1.0},
        # Plain SGD (lr/eps = 0.5), as in write_config: Adam would blow rounding noise up to full-size steps.
        "optim": {"lr": 500.0, "eps": 1000.0, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None},
        "run": quiet_run(output, **{"max_steps": 4, "checkpoint_every": 2, **run}),
    }
    path = output.with_suffix(".json")
    path.write_text(json.dumps(config))
    return path


def metric(output: Path, name: str) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[name] for record in records if name in record}


def test_a_batch_level_loss_sorts_the_global_batch(tiny_llm, tmp_path):
    """AOT sorts the margins of the whole batch: 2 processes × 2 pairs must sort all 4 together, as 1 × 4 does
    (each process sorting only its own 2 pairs gives a different loss by step 3)."""
    model, paired, _ = tiny_llm
    single, double = tmp_path / "single", tmp_path / "double"
    launch(write_llm_config(model, paired, single, "aot", batch_size=4, max_steps=3), processes=1)
    launch(write_llm_config(model, paired, double, "aot", batch_size=2, max_steps=3), processes=2)
    reference = losses(single)
    assert sorted(reference) == [1, 2, 3] and len(set(reference.values())) == 3
    # The all-reduce sums gradients in another order than one process does: by step 3 that moved the loss by
    # about 1e-4 (a CI run); sorting each process's pairs alone moves it by about 1e-2.
    assert losses(double) == pytest.approx(reference, abs=2e-3)


def test_kto_reference_point_spans_the_processes_and_a_checkpoint_resumes_under_one(tiny_llm, tmp_path):
    """KTO's z0 is the mean over every process's mismatched pairs, with 2 accumulated micro-batches per step."""
    model, _, unpaired = tiny_llm
    accumulate = {"gradient_accumulation_steps": 2}
    single = tmp_path / "single"  # 4 rows per micro-batch
    launch(write_llm_config(model, unpaired, single, "kto", batch_size=4, **accumulate), processes=1)
    reference = losses(single)
    assert sorted(reference) == [1, 2, 3, 4] and metric(single, "kl_reference_point")[3] > 0  # z0 shapes the loss

    # 2 rows per process and micro-batch: the same global micro-batches, for 3 steps (z0 > 0 at step 3).
    switched = tmp_path / "switched"
    launch(write_llm_config(model, unpaired, switched, "kto", batch_size=2, max_steps=3, **accumulate), processes=2)
    assert losses(switched) == pytest.approx({step: reference[step] for step in (1, 2, 3)}, abs=1e-5)
    # Its step-2 checkpoint finishes the run on 1 process: steps 3 and 4 as in the 1-process run.
    resume = str(switched / "checkpoints" / "step-0000002")
    launch(write_llm_config(model, unpaired, switched, "kto", batch_size=4, resume=resume, **accumulate), processes=1)
    assert losses(switched) == pytest.approx(reference, abs=1e-5)


def write_online_config(model: Path, prompts: Path, output: Path, **run) -> Path:
    config = {
        "kind": "llm_online",
        "method": "grpo",
        "model": {"pretrained": str(model), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"path": str(prompts), "max_prompt_length": 32},
        "rollout": {"group_size": 2, "max_new_tokens": 8},
        "rewards": [{"function": "online_rewards:letter_share"}],
        # The std of every process's rewards, and DAPO's normaliser over every process's tokens.
        "advantages": {"scale": "batch"},
        "policy": {"loss_type": "dapo"},
        "optim": {"lr": 500.0, "eps": 1000.0, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None},
        "run": quiet_run(output, **{"checkpoint_every": 100, **run}),
    }
    path = output.with_suffix(".json")
    path.write_text(json.dumps(config))
    return path


def test_grpo_on_two_processes_matches_one_process(tiny_llm, tmp_path):
    """Each process samples its prompts' groups from the prompts' sample ids: 2 processes × 2 prompts sample,
    score and train like 1 × 4, with the advantages' batch std and DAPO's token count over both processes."""
    model, paired, _ = tiny_llm  # the prompt column of the pair data
    single, double = tmp_path / "single", tmp_path / "double"
    launch(write_online_config(model, paired, single, batch_size=4, max_steps=3), processes=1)
    launch(write_online_config(model, paired, double, batch_size=2, max_steps=3), processes=2)
    reference = losses(single)
    assert sorted(reference) == [1, 2, 3] and len(set(reference.values())) == 3
    assert losses(double) == pytest.approx(reference, abs=1e-5)
    for name in ("reward/mean", "reward/std", "completions/length"):
        assert metric(double, name) == pytest.approx(metric(single, name), abs=1e-6), name


# --- FSDP2 on CPU: the engine-facing code with really sharded parameters -----------------------------------


def test_fsdp2_matches_one_process_resumes_under_one_and_gathers_a_plain_copy(tmp_path):
    worker = str(TESTS / "fsdp_worker.py")
    torchrun(2, worker, str(tmp_path / "sharded"), "--steps", "0", "2")
    checkpoint = tmp_path / "sharded" / "checkpoint"
    torchrun(1, worker, str(tmp_path / "resumed"), "--steps", "2", "4", "--resume", str(checkpoint))
    sharded = json.loads((tmp_path / "sharded" / "result.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "result.json").read_text())

    # The same training, unsharded, in one process with the whole batch.
    policy = make_policy()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    optimizer = make_optimizer(policy)
    first, first_norms = train_steps(policy, reference, optimizer, range(0, 2))
    with torch.no_grad():
        outputs_after_two = policy(probe())
    second, second_norms = train_steps(policy, reference, optimizer, range(2, 4))

    assert len(set(first + second)) == 4
    assert sharded["losses"] == pytest.approx(first, abs=1e-5)
    assert resumed["losses"] == pytest.approx(second, abs=1e-5)
    # The norm of the gradient shards is the norm of the whole gradient (clipped at 1 in both runs).
    assert sharded["grad_norms"] + resumed["grad_norms"] == pytest.approx(first_norms + second_norms, rel=1e-5)
    assert max(first_norms + second_norms) > 1.0
    # Evaluation and export see the full weights as a plain module on the main process.
    assert sharded["plain_parameter_types"] == ["Parameter"]
    # A NaN in the last process's shard makes every process refuse the weights.
    assert [json.loads((tmp_path / "sharded" / f"finite-{rank}.json").read_text()) for rank in (0, 1)] == [
        [True, False],
        [True, False],
    ]
    torch.testing.assert_close(torch.tensor(sharded["probe_outputs"]), outputs_after_two, atol=1e-5, rtol=0)
