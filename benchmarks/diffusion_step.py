"""Diffusion-DPO training-step throughput: diffalign's step against the diffusers research example's procedure.

Baseline (our re-implementation of that procedure): every step VAE-encodes both images and runs the text
encoder(s), draws shared noise and timesteps, runs the policy once on the concatenated pair batch and a
*separate* frozen reference UNet, then the loss, backward and an AdamW step.

diffalign: latents and text embeddings come from the cache (encoded once before training), the method and the
loss core are the real ones (`DiffusionDPO`, `compute_loss`), the reference is the policy with its adapters
disabled (LoRA) or a frozen copy (full), AdamW is fused on GPU and channels_last is optional.

Models are built from the published configs in configs/models/ with random weights (speed does not depend on
the weights). Prints a table with pairs/s, ms/step, peak memory, FLOPs per step (torch.utils.flop_counter) and
model-FLOPs utilisation, and the ratio of the two steps.

    python benchmarks/diffusion_step.py --model tiny                                  # CPU, a minute
    python benchmarks/diffusion_step.py --model sd15 --device cuda --resolution 512 --batch-size 8
    python benchmarks/diffusion_step.py --model sdxl --device cuda --resolution 1024 --batch-size 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.diffusion.families.stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily
from diffalign.diffusion.methods import DiffusionDPO, LatentPairBatch
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import LossConfig, compute_loss

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
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
    unet: torch.nn.Module, trainable: str, weight_dtype: torch.dtype
) -> list[torch.nn.Parameter]:
    unet.requires_grad_(trainable == "full")
    if trainable == "lora":
        unet.to(dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=8,
                lora_alpha=8,
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
        latents = family.vae.encode(pixels.to(family.vae.dtype)).latent_dist.sample() * family.latent_scale
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


def our_step(method: DiffusionDPO, unet, optimizer, batch: LatentPairBatch, autocast) -> torch.Tensor:
    with autocast():
        scores, _ = method.pair_scores(unet, batch)
    loss = compute_loss(scores, LossConfig(beta=BETA)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds per step, peak GiB, FLOPs per step)."""
    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # one sync at the end, as a real loop's logging does
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak, counter.get_total_flops()


def measure_baseline(models, parameters, trainable, weight_dtype, pixels, token_ids, autocast, args):
    """The baseline keeps a separate deep-copied reference UNet, as the diffusers example and official code do."""
    ref_unet = copy.deepcopy(models.family.denoiser).requires_grad_(False).to(weight_dtype)
    if trainable == "lora":
        ref_unet.disable_adapters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    step = lambda: baseline_step(models, ref_unet, optimizer, pixels, token_ids, autocast)  # noqa: E731
    return measure(step, torch.device(args.device), args.warmup, args.steps)


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
    token_ids = torch.randint(0, models.vocab_size, (2 * args.batch_size // 2, 77), generator=generator).to(
        device
    )
    rows = []

    parameters = make_trainable(unet, trainable, weight_dtype)
    seconds, peak, flops = measure_baseline(
        models, parameters, trainable, weight_dtype, pixels, token_ids, autocast, args
    )
    rows.append(
        {"step": "baseline", "trainable": trainable, "seconds": seconds, "peak": peak, "flops": flops}
    )

    # diffalign: cached latents and embeddings, adapter-disabled or frozen-copy reference, fused AdamW on GPU.
    with torch.no_grad(), autocast():
        latents = family.vae.encode(pixels.to(family.vae.dtype)).latent_dist.sample() * family.latent_scale
        prompt_embeds = encode_text(models, token_ids)
    batch = LatentPairBatch(
        chosen_latents=latents[: args.batch_size].to(weight_dtype),
        rejected_latents=latents[args.batch_size :].to(weight_dtype),
        prompt_embeds={k: v.to(weight_dtype) for k, v in prompt_embeds.items()},
    )
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    reference = ReferenceDenoiser(unet, frozen_copy=trainable == "full")
    if reference.copy is not None:
        reference.copy.to(weight_dtype)
    method = DiffusionDPO(family, reference)
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=device.type == "cuda")
    seconds, peak, flops = measure(
        lambda: our_step(method, unet, optimizer, batch, autocast), device, args.warmup, args.steps
    )
    rows.append(
        {"step": "diffalign", "trainable": trainable, "seconds": seconds, "peak": peak, "flops": flops}
    )
    assert latents.shape[-1] == args.resolution // vae_factor
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--trainable", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast on GPU")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense peak for MFU (H100 SXM bf16: 989)"
    )
    args = parser.parse_args()

    rows = []
    for trainable in ["lora", "full"] if args.trainable == "both" else [args.trainable]:
        rows += run(args, trainable)

    print(
        f"\nDiffusion-DPO step, model={args.model} resolution={args.resolution} pairs/step={args.batch_size} "
        f"device={args.device} precision={args.precision}"
    )
    header = f"{'step':<10} {'trainable':<9} {'pairs/s':>9} {'ms/step':>9} {'peak GiB':>9} {'TFLOP/step':>11} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        mfu = (row["flops"] / row["seconds"] / 1e12 / args.peak_tflops) if args.peak_tflops else float("nan")
        print(
            f"{row['step']:<10} {row['trainable']:<9} {args.batch_size / row['seconds']:>9.2f} "
            f"{1000 * row['seconds']:>9.1f} {row['peak']:>9.2f} {row['flops'] / 1e12:>11.4f} {mfu:>6.1%}"
        )
    for trainable in sorted({row["trainable"] for row in rows}):
        baseline, ours = (
            next(r for r in rows if r["step"] == s and r["trainable"] == trainable)
            for s in ("baseline", "diffalign")
        )
        print(
            f"{trainable}: diffalign step time = {ours['seconds'] / baseline['seconds']:.2f} × baseline "
            f"({baseline['seconds'] / ours['seconds']:.2f}× the pairs/s)"
        )


if __name__ == "__main__":
    main()
