"""Flow-GRPO's training step: peak memory and time against what one backward covers.

``FlowGRPO`` recomputes the sampled trajectories in their rollout chunks (``method.grpo.generation_batch_size``)
and backpropagates the loss one chunk at one trained step at a time, so one backward holds the graphs of one
chunk's denoiser call. The first row is one backward over every trajectory at every trained step (what a single
``loss.backward()`` of the summed loss does, and what runs under DeepSpeed). Every row runs the same training step
(the policy's recomputed SDE steps with classifier-free guidance, the clipped objective, the KL to the reference
and the backward) on the same hand-made trajectories and prompt embeddings (random: memory and time do not
depend on the values), each in a fresh process so that its peak memory is its own; each row's LoRA gradient is
compared with the first row's.

Model: SD3.5-medium's published transformer (configs/models/sd35-medium) at its real width with the stack cut to
``--layers`` blocks (0: all 24, for a GPU), LoRA rank 16 on the attention projections, the reference the
adapter-disabled policy. Peak memory: on CUDA the allocator's peak during the step; on a CPU (Linux) the process's
peak resident set during the step (reset at its start through /proc/self/clear_refs) above its resident set then.

    python benchmarks/grpo_memory.py --threads 2                    # CPU, 256 px, 2 blocks: a few minutes
    python benchmarks/grpo_memory.py --device cuda --layers 0 --resolution 512 --group-size 16 --chunks 16 4 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from common import machine, resident_gib, write_record
from flow_step import make_trainable, read_config, sd3_transformer

from diffalign.config import from_dict
from diffalign.diffusion.config import MethodConfig
from diffalign.diffusion.families.flow import Trajectory
from diffalign.diffusion.families.sd3 import StableDiffusion3Family
from diffalign.diffusion.methods import TrainingContext
from diffalign.diffusion.methods.grpo import FlowGRPO, Rollout
from diffalign.diffusion.reference import ReferenceDenoiser

TEXT_TOKENS = 77 + 128  # CLIP's 77 and a T5 prompt of 128 tokens, as the family concatenates them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (0: as published)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per micro-batch (run.batch_size)")
    parser.add_argument("--group-size", type=int, default=4, help="G trajectories per prompt")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of a rollout")
    parser.add_argument("--trained-steps", type=int, default=3, help="a window of this many steps is trained")
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="trajectories per backward (default: "
                        "the whole batch, half of it, a quarter, one)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    # Internal: run one row in this process.
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-backward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def method_for(args: argparse.Namespace, chunk: int) -> FlowGRPO:
    """The method around SD3.5-medium's transformer (LoRA) and scheduler, its prompts encoded as fixed random
    embeddings (the text encoders do not take part in the training step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    denoiser = sd3_transformer(args.layers).to(device)
    make_trainable(denoiser, "lora", dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_config("sd3", "scheduler"))
    family = StableDiffusion3Family.from_modules(denoiser=denoiser, noise_scheduler=scheduler)
    width, pooled = denoiser.config.joint_attention_dim, denoiser.config.pooled_projection_dim

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(prompt.encode())) for prompt in prompts]
        return {
            "prompt_embeds": torch.stack([torch.randn(TEXT_TOKENS, width, generator=g) for g in generators]),
            "pooled_prompt_embeds": torch.stack([torch.randn(pooled, generator=g) for g in generators]),
        }

    family.encode_prompts = lambda prompts: {k: v.to(device, dtype) for k, v in encode_prompts(prompts).items()}
    grpo = {
        "prompts": [f"prompt {i}" for i in range(args.prompts)],
        "group_size": args.group_size,
        "num_inference_steps": args.steps,
        "generation_batch_size": chunk,
        "trained_steps": "window",
        "window_size": args.trained_steps,
        "window_placement": "fixed",
        "kl_beta": 0.04,  # Flow-GRPO's SD3 configs
        "rewards": [{"name": "toy_t2i"}],  # loads nothing; the rewards below are fixed
    }
    settings = from_dict(MethodConfig, {"name": "grpo", "grpo": grpo}).grpo
    return FlowGRPO(family, ReferenceDenoiser(denoiser, frozen_copy=False), settings)


def run_row(args: argparse.Namespace) -> dict[str, float]:
    """One training step in rollout chunks of ``args.chunk`` trajectories, backpropagated a part at a time or
    (``--one-backward``) all at once; the LoRA gradient goes next to the result file."""
    method = method_for(args, args.chunk)
    family, device = method.family, torch.device(args.device)
    prompts = [f"prompt {i}" for i in range(args.prompts) for _ in range(args.group_size)]
    size = args.resolution // 8
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(len(prompts), args.steps + 1, 16, size, size, generator=generator).to(device)
    sigmas = family.inference_sigmas(args.steps, device)
    log_probs = torch.zeros(len(prompts), args.steps, device=device)
    stochastic = torch.ones(args.steps, dtype=torch.bool)
    rollouts = [
        Rollout(prompts[rows], Trajectory(latents[rows].to(family.denoiser.dtype), sigmas, stochastic, log_probs[rows]))
        for rows in (slice(i, i + args.chunk) for i in range(0, len(prompts), args.chunk))
    ]
    method.rollout = lambda *arguments: rollouts
    method.score = lambda samples, prompts: torch.linspace(0, 1, len(prompts)).unsqueeze(1)
    backward = None if args.one_backward else lambda part: part.backward()
    context = TrainingContext(step=0, seed=0, noise_seeds=list(range(args.prompts)), encode=None, backward=backward)
    batch = {"caption": [f"prompt {i}" for i in range(args.prompts)]}

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**30
    else:
        before = reset_peak_resident_gib()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        output = method.training_loss(family.denoiser, batch, context)
    if not output.backpropagated:
        output.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = peak_resident_gib()
    seconds = time.perf_counter() - start
    gradient = torch.cat([p.grad.flatten().float().cpu() for p in family.denoiser.parameters() if p.grad is not None])
    torch.save(gradient, args.result.with_suffix(".pt"))
    per_backward = f"{args.chunk} × {args.trained_steps}" if args.one_backward else f"{args.chunk} × 1"
    return {"per_backward": per_backward, "seconds": seconds, "peak_above_gib": peak - before}


def reset_peak_resident_gib() -> float:
    """Reset the process's peak resident set to its resident set now (Linux), and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return resident_gib()


def peak_resident_gib() -> float:
    """The process's peak resident set since the last reset (Linux: VmHWM of /proc/self/status), in GiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def launch_row(chunk: int, one_backward: bool, folder: Path) -> tuple[dict[str, float], torch.Tensor]:
    result = folder / f"chunk-{chunk}-{one_backward}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--chunk", str(chunk), "--result", str(result)]
    command += ["--one-backward"] if one_backward else []
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(result.read_text()), torch.load(result.with_suffix(".pt"))


def main() -> None:
    args = build_parser().parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.chunk is not None:
        args.result.write_text(json.dumps(run_row(args)))
        return
    trajectories = args.prompts * args.group_size
    chunks = args.chunks or sorted({trajectories, max(1, trajectories // 2), max(1, trajectories // 4), 1}, reverse=True)
    rows, gradients = [], []
    with tempfile.TemporaryDirectory() as folder:
        for chunk, one_backward in [(trajectories, True), *((chunk, False) for chunk in chunks)]:
            row, gradient = launch_row(chunk, one_backward, Path(folder))
            rows.append(row)
            gradients.append(gradient)
    for row, gradient in zip(rows, gradients):
        row["max_gradient_difference"] = (gradient - gradients[0]).abs().max().item() / gradients[0].abs().max().item()
    print_table(rows, args, trajectories)
    write_record(args, rows, versions={"torch": torch.__version__})


def print_table(rows: list[dict], args: argparse.Namespace, trajectories: int) -> None:
    print(
        f"\nFlow-GRPO training step, SD3.5-medium transformer ({args.layers or 'all'} blocks, LoRA 16), "
        f"{args.resolution} px, {trajectories} trajectories ({args.prompts} prompts × G {args.group_size}), "
        f"{args.trained_steps} trained steps with CFG, device={args.device} ({machine(args.device)}), "
        f"torch={torch.__version__}"
    )
    header = f"{'trajectories × steps/backward':>30} {'peak GiB':>9} {'s/step':>8} {'max |Δ grad| / max |grad|':>27}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['per_backward']:>30} {row['peak_above_gib']:>9.2f} {row['seconds']:>8.1f} "
            f"{row['max_gradient_difference']:>27.1e}"
        )
    what = "the allocator's peak during the step" if args.device == "cuda" else "peak resident set above the step's start"
    print(f"peak GiB: {what}; Δ grad against the first row (one backward over every trajectory and step)")


if __name__ == "__main__":
    main()
