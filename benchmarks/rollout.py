"""Online rollouts: our generation against the stock diffusers pipeline call, samples/s.

DRAGON, SePPO, online DPO and the evaluations sample with ``sample_latents`` (the family's ``sample`` over
batches of prompts); Flow-GRPO samples with ``FlowMatchFamily.sample_trajectory``, stochastic (SDE) steps with
their log-probs. Each is timed against the stock pipeline of the same model called as a user would, for the same
prompts, steps, guidance and batch, with one seeded generator per sample:
``pipeline(prompt=..., generator=..., num_inference_steps=..., guidance_scale=..., output_type="latent")``.
The runs alternate for ``--rounds`` rounds and the table keeps medians. ``max |Δ|`` is the largest difference
between our latents and the pipeline's from the same generators (deterministic samplers only; the SDE chain
draws other noise).

    python benchmarks/rollout.py --threads 1                       # both toys, CPU
    python benchmarks/rollout.py --model PATH/TO/PIPELINE --device cuda --batch-size 16 --resolution 512
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from common import benchmark_parser, machine, parse_benchmark_args, write_record
from diffusers import DiffusionPipeline

from diffalign.diffusion.families import FamilyOptions, family_class, load_family
from diffalign.diffusion.families.flow import FlowMatchFamily
from diffalign.diffusion.methods.online import sample_latents

ROOT = Path(__file__).resolve().parents[1]
TOYS = {"toy-t2i": ROOT / "assets" / "toy-t2i", "toy-t2i-flow": ROOT / "assets" / "toy-t2i-flow"}
PROMPTS = ["a red circle", "a small blue square", "a large green triangle", "a yellow star"]


def timed(function: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    latents = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, latents


def rollout_functions(family, pipeline, prompts: list[str], args) -> dict[str, Callable[[], torch.Tensor]]:
    """Zero-argument calls of each sampler, every one drawing sample i from a generator seeded i."""
    device = next(family.denoiser.parameters()).device
    seeds = list(range(len(prompts)))
    steps, guidance = args.steps, args.guidance_scale

    def generators() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(seed) for seed in seeds]

    flow = isinstance(family, FlowMatchFamily)
    extra = {"max_sequence_length": family.max_text_length} if flow else {}
    if args.resolution is not None:
        extra.update(height=args.resolution, width=args.resolution)

    def stock() -> torch.Tensor:
        return pipeline(
            prompt=prompts,
            generator=generators(),
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="latent",
            **extra,
        )[0]

    functions = {
        "pipeline": stock,
        "sample_latents": lambda: sample_latents(
            family, family.denoiser, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance,
            batch_size=len(prompts),
        ),
    }
    if flow:
        sde_steps = torch.ones(steps, dtype=torch.bool)
        sde_steps[-1] = False  # Flow-GRPO's last step is deterministic
        functions["sample_trajectory (SDE)"] = lambda: family.sample_trajectory(
            family.denoiser, prompts, generators(), num_inference_steps=steps, guidance_scale=guidance,
            noise_level=0.7, sde_steps=sde_steps,
        ).samples
    return functions


def run(args, name: str, path: Path) -> list[dict]:
    device = torch.device(args.device)
    flow = issubclass(family_class(str(path)), FlowMatchFamily)
    options = FamilyOptions(
        sample_resolution=args.resolution,
        max_text_length=args.max_text_length if flow else None,
        drop_text_encoders=("text_encoder_3",) if flow and args.drop_t5 else (),
    )
    family = load_family(str(path), options=options)
    family.to(device, torch.float32)
    family.denoiser.eval()
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if flow and args.drop_t5 else {}
    pipeline = DiffusionPipeline.from_pretrained(str(path), **without_t5).to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    functions = rollout_functions(family, pipeline, prompts, args)

    seconds: dict[str, list[float]] = {label: [] for label in functions}
    latents: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for label, function in functions.items():  # warm-up
            latents[label] = function()
        for round_index in range(args.rounds):
            order = list(functions) if round_index % 2 == 0 else list(reversed(functions))
            for label in order:
                elapsed, _ = timed(functions[label], device)
                seconds[label].append(elapsed)
    stock_rate = args.batch_size / statistics.median(seconds["pipeline"])
    rows = []
    for label in functions:
        rate = args.batch_size / statistics.median(seconds[label])
        deterministic = "SDE" not in label
        difference = (latents[label].float() - latents["pipeline"].float()).abs().max().item()
        rows.append(
            {
                "model": name,
                "sampler": label,
                "samples_per_s": rate,
                "vs_pipeline": rate / stock_rate,
                "max_abs_difference": difference if deterministic else None,
            }
        )
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, models=["toys", *TOYS])
    parser.set_defaults(model="toys", batch_size=16)
    parser.add_argument("--path", type=Path, default=None, help="another diffusers pipeline directory to time")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--max-text-length", type=int, default=8, help="T5 tokens of the flow families")
    parser.add_argument("--keep-t5", dest="drop_t5", action="store_false", help="SD3: load T5 (the toy has none)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_benchmark_args(parser)
    models = {args.model: TOYS[args.model]} if args.model in TOYS else dict(TOYS)
    if args.path is not None:
        models = {args.path.name: args.path}
    rows = [row for name, path in models.items() for row in run(args, name, path)]

    print(f"{machine(args.device)}, batch {args.batch_size}, {args.steps} steps, guidance {args.guidance_scale}")
    print("| model | sampler | samples/s | vs pipeline | max abs difference |")
    print("|---|---|---|---|---|")
    for row in rows:
        difference = "—" if row["max_abs_difference"] is None else f"{row['max_abs_difference']:.1e}"
        print(
            f"| {row['model']} | {row['sampler']} | {row['samples_per_s']:.2f} | {row['vs_pipeline']:.2f}× | "
            f"{difference} |"
        )
    write_record(args, rows, {"torch": torch.__version__, "diffusers": diffusers.__version__})


if __name__ == "__main__":
    main()
