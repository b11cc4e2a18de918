"""LLM DPO training throughput: diffalign's LLM trainer against TRL's DPOTrainer on the same model and data.

Both sides train the same randomly initialised model (a Llama or Qwen2 architecture built from a config: speed
does not depend on the weights) on the same synthetic pairs, with the same batch, sequence lengths, LoRA or
full fine-tune, optimizer (AdamW, torch's fused kernel on every device, lr 1e-6, no weight decay, clipping at
1), loss (sigmoid DPO, β = 0.1), precision (bf16 autocast on GPU, fp32 on CPU), attention (SDPA), gradient
checkpointing (off unless --gradient-checkpointing; TRL's default is on) and reference (the adapter-disabled
policy for LoRA, a frozen bf16 copy for a full fine-tune).

Every pair has a prompt of exactly --prompt-length tokens and completions of --completion-length tokens plus
EOS, so no row is padded and both sides process 2 · batch · (prompt + completion + 1) tokens per step (the
tokens/s of every side counts these). diffalign runs twice: as TRL does, and with model.share_prompt, where
each pair's prompt goes through the model once for both completions (the same log-probs from a quarter fewer
tokens at the default lengths). Each side runs its real training loop in a process of its own (so peak memory
is its own); the first --warmup optimizer steps are not timed. Printed: tokens/s, ms/step and peak memory of
each (on CPU also the peak above the libraries both sides import), and diffalign/TRL ratios.

TRL is installed for this benchmark only (`pip install trl`, it is no dependency of diffalign); check with
`pip install --dry-run trl` that it leaves torch, transformers, accelerate, peft and datasets as they are.

    python benchmarks/llm_step.py                                        # CPU, tiny Llama, a few minutes
    python benchmarks/llm_step.py --model qwen2-0.5b --layers 2          # CPU, Qwen2-0.5B widths, 2 of 24 layers
    python benchmarks/llm_step.py --model 1b --device cuda --batch-size 8 --prompt-length 512 \\
        --completion-length 511 --trainable both
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_parser, machine, parse_benchmark_args, resident_gib, trainables, write_record

# Model shapes. 1b is Llama-3.2-1B's (without its rope scaling, irrelevant to speed); qwen2-0.5b is Qwen2-0.5B's
# (its 151,936-token vocabulary makes the output projection most of a short-sequence step).
PRESETS = {
    "tiny": {
        "architecture": "llama",
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "1b": {
        "architecture": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "qwen2-0.5b": {
        "architecture": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# diffalign+shared: model.share_prompt, each pair's prompt run once for both completions.
SIDES = ("trl", "diffalign", "diffalign+shared")
LORA_RANK = 16


# --- the shared world: model, tokenizer, pairs ----------------------------------------------------------------------


def write_world(directory: Path, args: argparse.Namespace) -> None:
    """A random model, a byte-level tokenizer without merges (one character = one token, so lengths are exact)
    and the pairs.

    The tokenizer is transformers' Qwen2 tokenizer class, as AutoTokenizer loads that class for any Qwen2
    checkpoint whatever its tokenizer files say; the Llama presets load it too.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    preset = dict(PRESETS[args.model])
    architecture = preset.pop("architecture")
    if args.layers is not None:
        preset["num_hidden_layers"] = args.layers
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(bytes_to_unicode().values()))}
    pad, bos, eos = SPECIAL_TOKENS
    Qwen2Tokenizer(
        vocab=vocab, merges=[], pad_token=pad, bos_token=bos, eos_token=eos, unk_token=None
    ).save_pretrained(directory)

    torch.manual_seed(0)
    config_class, model_class = (
        (LlamaConfig, LlamaForCausalLM) if architecture == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_class(
        **preset,
        max_position_embeddings=max(2048, args.prompt_length + args.completion_length + 1),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model_class(config).to(torch.bfloat16).save_pretrained(directory)

    generator = torch.Generator().manual_seed(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def text(count: int) -> str:
        picks = torch.randint(len(alphabet), (count,), generator=generator)
        return "".join(alphabet[i] for i in picks.tolist())

    with (directory / "pairs.jsonl").open("w") as file:
        for _ in range(args.batch_size * (args.warmup + args.steps)):
            row = {
                "prompt": text(args.prompt_length),
                "chosen": text(args.completion_length),
                "rejected": text(args.completion_length),
            }
            file.write(json.dumps(row) + "\n")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def import_shared_libraries() -> float:
    """Import the libraries both sides use; return the resident GiB after.

    A GPU's peak allocation counts weights, optimizer state and activations but not the libraries; a CPU
    process's peak resident set counts the libraries too, and there the imports weigh more than a small
    model's whole training. Taking this figure off the peak counts what the GPU figure counts, plus what each
    side imports beyond the shared libraries (diffalign itself, TRL itself).
    """
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers

    transformers.AutoModelForCausalLM  # noqa: B018 (a lazy module: its model classes load on access)
    return resident_gib()


def memory_result(device: torch.device, resident_after_imports: float) -> dict[str, float]:
    """Peak memory, and the peak above the shared libraries' resident set (the same figure on a GPU)."""
    peak = peak_memory_gib(device)
    above_imports = peak if device.type == "cuda" else peak - resident_after_imports
    return {"peak_gib": peak, "peak_above_imports_gib": above_imports}


# --- the two sides, each run in its own process ---------------------------------------------------------------------


def run_diffalign(
    world: Path,
    trainable: str,
    args: argparse.Namespace,
    resident_after_imports: float,
    *,
    share_prompt: bool,
) -> dict[str, float]:
    """diffalign's LLM trainer on the shared loop; its metrics.jsonl windows give the steady-state step time.
    ``share_prompt``: each pair's prompt runs once for both completions (``model.share_prompt``)."""
    from diffalign.config import from_dict
    from diffalign.llm.config import LLMTrainConfig
    from diffalign.llm.trainer import train

    output = world / f"diffalign-{trainable}-{share_prompt}"
    train(from_dict(LLMTrainConfig, diffalign_settings(world, output, trainable, args, share_prompt)))
    seconds_per_step = timed_seconds_per_step(output / "metrics.jsonl", args)
    memory = memory_result(torch.device(args.device), resident_after_imports)
    return {"seconds_per_step": seconds_per_step, **memory}


def diffalign_settings(
    world: Path, output: Path, trainable: str, args: argparse.Namespace, share_prompt: bool
) -> dict:
    """The run's config, as the YAML of an LLM DPO run would give it."""
    return {
        "kind": "llm",
        "model": {
            "pretrained": str(world),
            "trainable": trainable,
            "lora": {"rank": LORA_RANK, "target_modules": ["all-linear"]},  # alpha 2·rank, as TRL's below
            "attn_implementation": "sdpa",
            "share_prompt": share_prompt,
        },
        "data": {
            "path": str(world / "pairs.jsonl"),
            "max_prompt_length": args.prompt_length,
            "max_length": args.prompt_length + args.completion_length + 1,
        },
        "reference": {"strategy": "auto"},
        "loss": {"type": ["sigmoid"], "beta": 0.1},
        "optim": {
            "lr": 1e-6,
            "weight_decay": 0.0,
            "scheduler": "constant",
            "warmup_steps": 0,
            "fused": "always",  # as TRL's adamw_torch_fused below, on a CPU too
        },
        "run": {
            "output_dir": str(output),
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "log_every": args.warmup,  # the first window is the warm-up; the later ones are timed
            "checkpoint_every": 10**9,
            "trackers": [],
            "progress_bar": False,
            "mixed_precision": "bf16" if args.device == "cuda" else "no",
            "gradient_checkpointing": args.gradient_checkpointing,
        },
    }


def timed_seconds_per_step(metrics_file: Path, args: argparse.Namespace) -> float:
    """Mean step time over the logging windows after the first (the warm-up), from the run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    records = [record for record in records if "pairs_per_s" in record]
    tokens_per_pair = records[-1]["tokens_per_s"] / records[-1]["pairs_per_s"]
    if round(tokens_per_pair) != 2 * (args.prompt_length + args.completion_length + 1):
        raise RuntimeError(f"diffalign counted {tokens_per_pair:.1f} tokens per pair, not the benchmark's")
    seconds = steps = 0.0
    for previous, record in itertools.pairwise(records):
        window_steps = record["step"] - previous["step"]
        seconds += window_steps * args.batch_size / record["pairs_per_s"]
        steps += window_steps
    return seconds / steps


def run_trl(
    world: Path, trainable: str, args: argparse.Namespace, resident_after_imports: float
) -> dict[str, float]:
    """TRL's DPOTrainer (its own Trainer loop); a callback times the steps after the warm-up."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    device = torch.device(args.device)
    low_precision = torch.bfloat16 if device.type == "cuda" else torch.float32

    def load(dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(world, dtype=dtype, attn_implementation="sdpa")

    # As diffalign: LoRA on low-precision frozen weights; a full fine-tune trains fp32 weights against a frozen
    # low-precision copy of the initial model.
    model = load(low_precision if trainable == "lora" else torch.float32)
    ref_model = load(low_precision) if trainable == "full" else None
    peft_config = None
    if trainable == "lora":
        peft_config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    timer = step_timer(args, device)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trl_settings(world, trainable, args),
        train_dataset=load_dataset("json", data_files=str(world / "pairs.jsonl"), split="train"),
        processing_class=AutoTokenizer.from_pretrained(world),
        peft_config=peft_config,
        callbacks=[timer],
    )
    tokens = sum(len(row["prompt_ids"]) + len(row["chosen_ids"]) for row in trainer.train_dataset)
    expected = len(trainer.train_dataset) * (args.prompt_length + args.completion_length + 1)
    if tokens != expected:
        raise RuntimeError(f"TRL tokenized {tokens} prompt+chosen tokens, diffalign's count is {expected}")
    trainer.train()
    memory = memory_result(device, resident_after_imports)
    return {"seconds_per_step": (timer.end - timer.start) / args.steps, **memory}


def step_timer(args: argparse.Namespace, device: torch.device):
    """A Trainer callback that times the steps after the warm-up (``start`` and ``end``, synchronised)."""
    from transformers import TrainerCallback

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        start = end = 0.0

        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                synchronize()
                self.start = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup + args.steps:
                synchronize()
                self.end = time.perf_counter()

    return StepTimer()


def trl_settings(world: Path, trainable: str, args: argparse.Namespace):
    """TRL's DPOConfig with diffalign's settings (see the module docstring)."""
    from trl import DPOConfig

    cuda = args.device == "cuda"
    return DPOConfig(
        output_dir=str(world / f"trl-{trainable}"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.prompt_length + args.completion_length + 1,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=args.warmup,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


# --- orchestration ----------------------------------------------------------------------------------------------------


def run_side(side: str, trainable: str, world: Path, args: argparse.Namespace) -> dict[str, float]:
    """One side in a fresh process: its own peak memory, no state shared with the other side."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--side",
            side,
            "--trainable",
            trainable,
            "--world",
            str(world),
            "--result",
            result.name,
        ]
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return json.loads(Path(result.name).read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, models=sorted(PRESETS))
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=63, help="tokens before the EOS")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    # Internal: run one side in this process (how the parent measures each side in isolation).
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parse_benchmark_args(parser)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first logging window is the warm-up)")

    if args.side is not None:
        resident_after_imports = import_shared_libraries()
        if args.side == "trl":
            result = run_trl(args.world, args.trainable, args, resident_after_imports)
        else:
            shared = args.side == "diffalign+shared"
            result = run_diffalign(
                args.world, args.trainable, args, resident_after_imports, share_prompt=shared
            )
        args.result.write_text(json.dumps(result))
        return

    import transformers
    import trl

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        world = Path(directory)
        write_world(world, args)
        for trainable in trainables(args):
            for side in SIDES:
                result = run_side(side, trainable, world, args)
                rows.append({"side": side, "trainable": trainable, **result})
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    print_table(rows, args, versions)
    write_record(args, rows, versions=versions)


def print_table(rows: list[dict], args: argparse.Namespace, versions: dict[str, str]) -> None:
    """The rows (each gains ``tokens_per_s``) and every diffalign side's ratios to TRL."""
    tokens_per_step = 2 * args.batch_size * (args.prompt_length + args.completion_length + 1)
    print(
        f"\nLLM DPO step, model={args.model} (random weights) layers={args.layers or PRESETS[args.model]['num_hidden_layers']} "
        f"pairs/step={args.batch_size} "
        f"tokens/row={args.prompt_length + args.completion_length + 1} device={args.device} ({machine(args.device)}) "
        f"gradient_checkpointing={args.gradient_checkpointing} "
        + " ".join(f"{name}={version}" for name, version in versions.items())
    )
    header = (
        f"{'side':<17} {'trainable':<9} {'tokens/s':>10} {'ms/step':>9} {'peak GiB':>9} "
        f"{'above imports GiB':>18}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        row["tokens_per_s"] = tokens_per_step / row["seconds_per_step"]
        print(
            f"{row['side']:<17} {row['trainable']:<9} {row['tokens_per_s']:>10.0f} "
            f"{1000 * row['seconds_per_step']:>9.1f} {row['peak_gib']:>9.2f} "
            f"{row['peak_above_imports_gib']:>18.2f}"
        )
    for trainable, side in itertools.product(dict.fromkeys(row["trainable"] for row in rows), SIDES[1:]):
        trl_row, ours = (
            next(r for r in rows if r["side"] == s and r["trainable"] == trainable) for s in ("trl", side)
        )
        print(
            f"{trainable}, {side}: /TRL tokens/s = {ours['tokens_per_s'] / trl_row['tokens_per_s']:.2f}× "
            f"(target ≥ 1.5), peak memory = {ours['peak_gib'] / trl_row['peak_gib']:.2f}×, above imports "
            f"{ours['peak_above_imports_gib'] / trl_row['peak_above_imports_gib']:.2f}× (target ≤ 0.7)"
        )
    if args.device != "cuda":
        print(
            "on CPU, peak GiB is each process's peak resident set (imports included); above imports takes "
            "off the resident set after the libraries both sides import (transformers, peft, accelerate, "
            "datasets)"
        )


if __name__ == "__main__":
    main()
