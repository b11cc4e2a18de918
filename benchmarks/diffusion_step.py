"""Diffusion-DPO training-step throughput: diffalign's step against the diffusers research example's procedure.

Baseline (our re-implementation of that procedure): every step VAE-encodes both images and runs the text
encoder(s), draws shared noise and timesteps, runs the policy once on the concatenated pair batch and a
*separate* frozen reference UNet, then the loss, backward and an AdamW step.

diffalign: latents and text embeddings come from the cache (encoded once before training), the method and the
loss core are the real ones (`DiffusionDPO`, `compute_loss`, per-pair noise seeds as the trainer passes them),
the reference is the policy with its adapters disabled (LoRA) or a frozen copy (full), AdamW is fused on GPU,
attention is PyTorch SDPA (diffusers' default processor) and the step reads nothing back on the host.
Each speed switch of the trainer is then measured as its own row, on top of those defaults:

    +channels_last   model.channels_last: true
    +ref_cache       model.reference_cache: reference errors read from a table, no reference forward (a change
                     of the estimator, see diffalign/diffusion/reference_cache.py); a frozen copy leaves the device
    +grad_ckpt       run.gradient_checkpointing: true (trades time for activation memory)
    -sdpa            the classic attention processor instead of SDPA, to show what SDPA is worth
    best             channels_last + ref_cache
    +compile         torch.compile of the denoiser (model.compile: true), with --compile; the estimator is unchanged
    best+compile     best with torch.compile of the denoiser, with --compile

Models are built from the published configs in configs/models/ with random weights (speed does not depend on
the weights). Prints a table with pairs/s, ms/step, peak memory, FLOPs per step (torch.utils.flop_counter) and
model-FLOPs utilisation, and each row's speed-up over the baseline.

    python benchmarks/diffusion_step.py --model tiny                                  # CPU, a few minutes
    python benchmarks/diffusion_step.py --model sd15 --device cuda --resolution 512 --batch-size 8 --compile \
        --peak-tflops 989
    python benchmarks/diffusion_step.py --model sdxl --device cuda --resolution 1024 --batch-size 2 --compile \
        --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import real_example
import torch
import torch.nn.functional as F
from common import benchmark_parser, machine, measure, parse_benchmark_args, trainables, write_record
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.diffusion.families.stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.reference_cache import ReferenceErrors
from diffalign.losses import LossConfig, compute_loss

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
TOY_PIPELINE = Path(__file__).resolve().parents[1] / "assets" / "toy-t2i"
BETA = 5000.0

TINY = {
    "unet": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "block_out_channels": [32, 64, 64],
        "latent_channels": 4,
        "norm_num_groups": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
    },
}


@dataclass
class Models:
    family: StableDiffusionFamily
    text_encoders: list[torch.nn.Module]
    vocab_size: int


def load_config(model: str, name: str) -> dict:
    if model == "tiny":
        return dict(TINY[name])
    if model == "toy":  # the shipped toy pipeline's architecture (its weights are not used)
        file = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
        return json.loads((TOY_PIPELINE / file).read_text())
    return json.loads((MODEL_CONFIGS / model / f"{name}.json").read_text())


def build_models(model: str, device: torch.device, weight_dtype: torch.dtype) -> Models:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_config(model, "unet"))
    vae = AutoencoderKL.from_config(load_config(model, "vae")).to(device, weight_dtype).requires_grad_(False)
    text_config = CLIPTextConfig(
        **{k: v for k, v in load_config(model, "text_encoder").items() if not k.startswith("_")}
    )
    text_encoders = [CLIPTextModel(text_config)]
    family_class = StableDiffusionFamily
    if model == "sdxl":
        config_2 = load_config(model, "text_encoder_2")
        text_encoders.append(
            CLIPTextModelWithProjection(
                CLIPTextConfig(**{k: v for k, v in config_2.items() if not k.startswith("_")})
            )
        )
        family_class = StableDiffusionXLFamily
    text_encoders = [
        encoder.to(device, weight_dtype).requires_grad_(False).eval() for encoder in text_encoders
    ]
    scheduler = DDPMScheduler.from_config(load_config(model, "scheduler") if model != "tiny" else {})
    family = family_class.from_modules(denoiser=unet.to(device), vae=vae, noise_scheduler=scheduler)
    return Models(family=family, text_encoders=text_encoders, vocab_size=text_config.vocab_size)


def encode_text(models: Models, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The family's text encoding, on token ids (the tokenizer's cost is negligible and the same for both)."""
    if len(models.text_encoders) == 1:
        return {"prompt_embeds": models.text_encoders[0](token_ids)[0]}
    outputs = [encoder(token_ids, output_hidden_states=True) for encoder in models.text_encoders]
    return {
        "prompt_embeds": torch.cat([output.hidden_states[-2] for output in outputs], dim=-1),
        "pooled_prompt_embeds": outputs[-1][0],
    }


def make_trainable(
    unet: torch.nn.Module, trainable: str, weight_dtype: torch.dtype, lora_rank: int = 8
) -> list[torch.nn.Parameter]:
    unet.requires_grad_(trainable == "full")
    if trainable == "lora":
        unet.to(dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return [p for p in unet.parameters() if p.requires_grad]


def baseline_step(
    models: Models, ref_unet: torch.nn.Module, optimizer, pixels, token_ids, autocast
) -> torch.Tensor:
    family, unet = models.family, models.family.denoiser
    with torch.no_grad(), autocast():
        latents = family.to_latents(family.vae.encode(pixels.to(family.vae.dtype)).latent_dist.sample())
        prompt_embeds = encode_text(models, token_ids)
    batch_size = latents.shape[0] // 2
    noise = torch.randn_like(latents[:batch_size]).repeat(2, 1, 1, 1)
    timesteps = torch.randint(0, 1000, (batch_size,), device=latents.device).repeat(2)
    noisy = family.add_noise(latents, noise, timesteps)
    inputs = family.denoiser_inputs({k: torch.cat([v, v]) for k, v in prompt_embeds.items()}, {})
    with autocast():
        model_error = F.mse_loss(
            unet(noisy, timesteps, **inputs).sample.float(), noise.float(), reduction="none"
        )
        model_error = model_error.mean(dim=(1, 2, 3))
        with torch.no_grad():
            ref_error = F.mse_loss(
                ref_unet(noisy, timesteps, **inputs).sample.float(), noise.float(), reduction="none"
            )
            ref_error = ref_error.mean(dim=(1, 2, 3))
    model_w, model_l = model_error.chunk(2)
    ref_w, ref_l = ref_error.chunk(2)
    loss = -F.logsigmoid(-0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def our_step(
    method: DiffusionDPO,
    unet,
    optimizer,
    batch: LatentPairBatch,
    autocast,
    reference_errors: ReferenceErrors | None,
    pair_index: torch.Tensor,
) -> torch.Tensor:
    with autocast():
        cached = reference_errors.lookup(pair_index) if reference_errors is not None else None
        scores, _ = method.pair_scores(unet, batch, reference_errors=cached)
    loss = compute_loss(scores, LossConfig(beta=BETA)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_baseline(models, parameters, trainable, weight_dtype, pixels, token_ids, autocast, args):
    """The baseline keeps a separate deep-copied reference UNet, as the diffusers example and official code do."""
    ref_unet = copy.deepcopy(models.family.denoiser).requires_grad_(False).to(weight_dtype)
    if trainable == "lora":
        ref_unet.disable_adapters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    step = lambda: baseline_step(models, ref_unet, optimizer, pixels, token_ids, autocast)  # noqa: E731
    return measure(step, torch.device(args.device), args.warmup, args.steps)


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    ref_cache: bool = False
    grad_ckpt: bool = False
    sdpa: bool = True
    compile: bool = False


VARIANTS = [
    Variant("diffalign"),
    Variant("+channels_last", channels_last=True),
    Variant("+ref_cache", ref_cache=True),
    Variant("+grad_ckpt", grad_ckpt=True),
    Variant("-sdpa", sdpa=False),
    Variant("best", channels_last=True, ref_cache=True),
    # In-place compilation cannot be undone, so the compiled rows come last.
    Variant("+compile", compile=True),
    Variant("best+compile", channels_last=True, ref_cache=True, compile=True),
]


def configure(unet: UNet2DConditionModel, variant: Variant) -> None:
    """Put the shared U-Net in the variant's state; every switch is set explicitly, so rows do not leak."""
    unet.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    unet.set_attn_processor(AttnProcessor2_0() if variant.sdpa else AttnProcessor())
    if variant.grad_ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


def measure_variant(variant, unet, family, parameters, trainable, weight_dtype, batch, autocast, args, flops):
    device = torch.device(args.device)
    configure(unet, variant)
    # A fresh reference per row: the frozen copy (full) is made before compiling, as the trainer does.
    reference = ReferenceDenoiser(unet, frozen_copy=trainable == "full")
    if reference.copy is not None:
        reference.copy.to(weight_dtype)
    if variant.compile:
        unet.compile(mode=args.compile_mode)
        if reference.copy is not None:
            reference.copy.compile(mode=args.compile_mode)
    method = DiffusionDPO(family, reference)
    pair_index = torch.arange(batch.size, device=device)
    reference_errors = None
    if variant.ref_cache:
        # What the trainer precomputes once per pair (same noise seeds, same autocast), then reads by index.
        with autocast():
            errors = method.reference_errors(batch).float()
        table = torch.stack(errors.chunk(2), dim=1)
        reference_errors = ReferenceErrors(table=table, path=Path("in-memory"), built=True)
        reference.offload()  # a frozen copy is not needed on the device any more
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=device.type == "cuda")
    seconds, peak, counted = measure(
        lambda: our_step(method, unet, optimizer, batch, autocast, reference_errors, pair_index),
        device,
        args.warmup,
        args.steps,
        # FLOPs of a compiled step are those of the same step eager; the counter would only see the graph call.
        count_flops=not variant.compile,
    )
    return seconds, peak, counted if counted is not None else flops


def run(args: argparse.Namespace, trainable: str) -> list[dict]:
    device = torch.device(args.device)
    weight_dtype = torch.bfloat16 if (device.type == "cuda" and args.precision == "bf16") else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16)

    models = build_models(args.model, device, weight_dtype)
    family, unet = models.family, models.family.denoiser
    vae_factor = 2 ** (len(family.vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    pixels = (
        torch.rand(2 * args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2 - 1
    ).to(device)
    token_ids = torch.randint(0, models.vocab_size, (args.batch_size, 77), generator=generator).to(device)
    rows = []

    parameters = make_trainable(unet, trainable, weight_dtype, args.lora_rank)
    seconds, peak, flops = measure_baseline(
        models, parameters, trainable, weight_dtype, pixels, token_ids, autocast, args
    )
    rows.append(
        {"step": "baseline", "trainable": trainable, "seconds": seconds, "peak": peak, "flops": flops}
    )
    print(f"  {trainable} baseline: {1000 * seconds:.1f} ms/step", flush=True)
    batch = cached_batch(models, pixels, token_ids, weight_dtype, autocast)
    assert batch.chosen_latents.shape[-1] == args.resolution // vae_factor
    variants = [
        v for v in VARIANTS if (args.compile or not v.compile) and (not args.only or v.name in args.only)
    ]
    # A compiled row reports the FLOPs of its eager twin (the same switches without compile).
    eager_flops: dict[Variant, int | None] = {}
    for variant in variants:
        eager_twin = dataclasses.replace(variant, name="", compile=False)
        seconds, peak, flops = measure_variant(
            variant,
            unet,
            family,
            parameters,
            trainable,
            weight_dtype,
            batch,
            autocast,
            args,
            eager_flops.get(eager_twin),
        )
        if not variant.compile:
            eager_flops[eager_twin] = flops
        print(f"  {trainable} {variant.name}: {1000 * seconds:.1f} ms/step", flush=True)
        rows.append(
            {"step": variant.name, "trainable": trainable, "seconds": seconds, "peak": peak, "flops": flops}
        )
    return rows


def cached_batch(
    models: Models, pixels: torch.Tensor, token_ids: torch.Tensor, weight_dtype: torch.dtype, autocast: Callable
) -> LatentPairBatch:
    """The batch diffalign's step reads from its latent cache, encoded here once, outside the timed steps."""
    pairs = len(token_ids)
    family = models.family
    with torch.no_grad(), autocast():
        latents = family.to_latents(family.vae.encode(pixels.to(family.vae.dtype)).latent_dist.sample())
        prompt_embeds = encode_text(models, token_ids)
    return LatentPairBatch(
        chosen_latents=latents[:pairs].to(weight_dtype),
        rejected_latents=latents[pairs:].to(weight_dtype),
        prompt_embeds={k: v.to(weight_dtype) for k, v in prompt_embeds.items()},
        noise_seeds=list(range(pairs)),  # one generator per pair, as the trainer draws them
    )


def against(args: argparse.Namespace) -> None:
    """The real example and diffalign's trainer as subprocesses, then this script's re-implementation of the
    example's step in-process on the same architecture and settings, as a labelled second row."""
    times = real_example.measure_against(args.against, args.rounds)
    torch.set_num_threads(1)
    baseline_args = argparse.Namespace(**{**vars(args), "warmup": 15, "steps": 45, "device": "cpu"})
    models = build_models("toy", torch.device("cpu"), torch.float32)
    parameters = make_trainable(models.family.denoiser, "lora", torch.float32, real_example.RANK)
    generator = torch.Generator().manual_seed(0)
    size, pairs = real_example.RESOLUTION, real_example.PAIRS_PER_STEP
    pixels = torch.rand(2 * pairs, 3, size, size, generator=generator) * 2 - 1
    token_ids = torch.randint(0, models.vocab_size, (pairs, 77), generator=generator)
    baseline, _, _ = measure_baseline(
        models, parameters, "lora", torch.float32, pixels, token_ids, contextlib.nullcontext, baseline_args
    )
    rows = real_example.print_against(times, baseline, args.against)
    write_record(args, rows, versions={"torch": torch.__version__})


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, models=["tiny", "toy", "sd15", "sdxl"])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast on GPU")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the +compile and best+compile rows (slow to compile on CPU)",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    parser.add_argument("--only", nargs="+", default=None, help="measure only these diffalign rows")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense peak for MFU (H100 SXM bf16: 989)"
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        metavar="TRAIN_DIFFUSION_DPO_PY",
        help="your copy of the diffusers example's train_diffusion_dpo.py: run it and diffalign's trainer side by "
        "side on the toy job (see real_example.py) instead of the rows above",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --against: alternating rounds, median kept")
    return parser


def main() -> None:
    args = parse_benchmark_args(build_parser())
    if args.against is not None:
        against(args)
        return
    rows = [row for trainable in trainables(args) for row in run(args, trainable)]
    print_table(rows, args)
    write_record(args, rows, versions={"torch": torch.__version__})


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The rows (each gains ``pairs_per_s``, ``speedup`` against its baseline and ``mfu``)."""
    print(
        f"\nDiffusion-DPO step, model={args.model} resolution={args.resolution} pairs/step={args.batch_size} "
        f"device={args.device} ({machine(args.device)}) precision={args.precision} torch={torch.__version__}"
    )
    header = (
        f"{'step':<15} {'trainable':<9} {'pairs/s':>9} {'ms/step':>9} {'peak GiB':>9} {'TFLOP/step':>11} "
        f"{'MFU':>6} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        baseline = next(r for r in rows if r["step"] == "baseline" and r["trainable"] == row["trainable"])
        row["pairs_per_s"] = args.batch_size / row["seconds"]
        row["speedup"] = baseline["seconds"] / row["seconds"]
        tflops = row["flops"] / 1e12 if row["flops"] is not None else float("nan")
        row["mfu"] = tflops / row["seconds"] / args.peak_tflops if args.peak_tflops else None
        mfu = f"{row['mfu']:>6.1%}" if row["mfu"] is not None else f"{'n/a':>6}"
        print(
            f"{row['step']:<15} {row['trainable']:<9} {row['pairs_per_s']:>9.2f} {1000 * row['seconds']:>9.1f} "
            f"{row['peak']:>9.2f} {tflops:>11.4f} {mfu} {row['speedup']:>8.2f}×"
        )
    print(
        "speed-up: baseline step time / row step time (≥ 2 is the GPU target; CPU target: diffalign ≤ 0.7× time)"
    )


if __name__ == "__main__":
    main()
