"""Flow-matching Diffusion-DPO step (SD3/SD3.5, FLUX.1, Qwen-Image, SANA): diffalign's step against the diffusers
examples' way.

Baseline, written as diffusers' SD3, FLUX, Qwen-Image and SANA training examples (``examples/dreambooth/
train_dreambooth_lora_sd3.py``, ``train_dreambooth_lora_flux.py``, ``train_dreambooth_lora_qwen_image.py``,
``train_dreambooth_lora_sana.py``) structure their step, with the Diffusion-DPO loss on top as the flow-model DPO
peers do: every step VAE-encodes both images (``(x − shift) · scale``; Qwen-Image: one video frame,
``(x − mean_c)/std_c``; SANA: the DC-AE's deterministic ``latent · scale``) and runs every text encoder (captions
differ per pair), draws ``u`` with ``compute_density_for_timestep_sampling`` (the examples' default: logit-normal
for SD3 and FLUX, uniform for Qwen-Image and SANA), indexes the scheduler's σ grid, noises ``(1 − σ)·x + σ·ε``,
runs the policy on the concatenated pair batch (FLUX: latents packed 2×2 with image ids and the guidance
embedding; Qwen-Image: packed 2×2 with ``img_shapes`` and the text mask; SANA: the latent grid with the text mask)
and a *separate* deep-copied reference, and takes the DPO loss on the velocity errors ``‖v − (ε − x)‖²``.

diffalign: latents and text embeddings come from the cache (encoded once, outside the timed steps), the family
(``StableDiffusion3Family`` / ``FluxFamily`` / ``QwenImageFamily`` / ``SanaFamily``), the method (``DiffusionDPO``) and the loss
core are the real ones, and the reference is the policy with its adapters disabled (LoRA) or a frozen copy (full).

Models are the published SD3.5-medium, FLUX.1-dev, Qwen-Image and SANA 1600M configs in configs/models/ at their
real width, with every transformer and text-encoder stack cut to ``--layers`` blocks (0: as published, for a GPU)
and random weights (speed does not depend on the weights); prompts are cut to ``--text-length`` T5 (Qwen-Image:
Qwen2.5-VL, SANA: Gemma-2) tokens.

    python benchmarks/flow_step.py --model sd3 --threads 1          # CPU, a few minutes
    python benchmarks/flow_step.py --model flux --threads 1
    python benchmarks/flow_step.py --model qwen-image --threads 1
    python benchmarks/flow_step.py --model sana --threads 1 --resolution 256
    python benchmarks/flow_step.py --model flux --device cuda --layers 0 --resolution 1024 --batch-size 1
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from common import benchmark_parser, machine, measure, parse_benchmark_args, trainables, write_record
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft import LoraConfig
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from diffalign.diffusion.families.flux import FluxFamily
from diffalign.diffusion.families.qwen_image import ImageFrameVAE, QwenImageFamily
from diffalign.diffusion.families.sana import SanaFamily, flow_match_scheduler
from diffalign.diffusion.families.sd3 import StableDiffusion3Family
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import LossConfig, compute_loss

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
FOLDERS = {"sd3": "sd35-medium", "flux": "flux1-dev", "qwen-image": "qwen-image", "sana": "sana-1600m-1024"}
# The examples' default timestep density (their --weighting_scheme).
DENSITY = {"sd3": "logit_normal", "flux": "logit_normal", "qwen-image": "none", "sana": "none"}
# Pixels per latent (the VAE) times the transformer's patching: what --resolution must be a multiple of.
MULTIPLE = {"sd3": 16, "flux": 16, "qwen-image": 16, "sana": 32}
QWEN_TEMPLATE_TOKENS = 34  # QwenImagePipeline's prompt_template_encode_start_idx: template tokens it drops
BETA = 5000.0
# The attention and MLP projections of both transformers' blocks, as the diffusers LoRA examples target them.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def read_config(model: str, name: str) -> dict[str, Any]:
    config = json.loads((MODEL_CONFIGS / FOLDERS[model] / f"{name}.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def cut(config: dict[str, Any], layers: int, *keys: str) -> dict[str, Any]:
    """``config`` with each stack named by ``keys`` cut to ``layers`` blocks (0 keeps the published depth)."""
    if layers:
        config.update({key: min(config[key], layers) for key in keys})
    return config


@dataclass
class Models:
    family: StableDiffusion3Family | FluxFamily | QwenImageFamily | SanaFamily
    clip_encoders: list[torch.nn.Module]  # SD3: CLIP-L and CLIP-G with projections; FLUX: CLIP-L; Qwen, SANA: none
    t5: torch.nn.Module  # Qwen-Image: Qwen2.5-VL in its place; SANA: Gemma-2
    vocab_sizes: tuple[int, int]  # CLIP, T5 (Qwen-Image, SANA: their text encoder's, twice)


def build_models(model: str, layers: int, device: torch.device, dtype: torch.dtype) -> Models:
    torch.manual_seed(0)
    if model == "qwen-image":
        return build_qwen_image(layers, device, dtype)
    if model == "sana":
        return build_sana(layers, device, dtype)
    vae = AutoencoderKL.from_config(read_config(model, "vae")).to(device, dtype).requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_config(model, "scheduler"))
    t5_config = T5Config(
        **cut(
            read_config(model, "text_encoder_3" if model == "sd3" else "text_encoder_2"), layers, "num_layers"
        )
    )
    t5 = T5EncoderModel(t5_config)
    clip_config = CLIPTextConfig(**cut(read_config(model, "text_encoder"), layers, "num_hidden_layers"))
    if model == "sd3":
        denoiser = sd3_transformer(layers)
        clip_g = CLIPTextConfig(**cut(read_config(model, "text_encoder_2"), layers, "num_hidden_layers"))
        clip_encoders = [CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_g)]
        family_class = StableDiffusion3Family
    else:
        denoiser = FluxTransformer2DModel.from_config(
            cut(read_config(model, "transformer"), layers, "num_layers", "num_single_layers")
        )
        clip_encoders = [CLIPTextModel(clip_config)]
        family_class = FluxFamily
    frozen = [encoder.to(device, dtype).requires_grad_(False).eval() for encoder in [*clip_encoders, t5]]
    family = family_class.from_modules(denoiser=denoiser.to(device), vae=vae, noise_scheduler=scheduler)
    return Models(family, frozen[:-1], frozen[-1], (clip_config.vocab_size, t5_config.vocab_size))


def sd3_transformer(layers: int) -> SD3Transformer2DModel:
    """SD3.5-medium's published transformer with its stack cut to ``layers`` blocks (random weights)."""
    config = cut(read_config("sd3", "transformer"), layers, "num_layers")
    depth = config["num_layers"]
    config["dual_attention_layers"] = [index for index in config.get("dual_attention_layers", []) if index < depth]
    return SD3Transformer2DModel.from_config(config)


def build_qwen_image(layers: int, device: torch.device, dtype: torch.dtype) -> Models:
    text_config = read_config("qwen-image", "text_encoder")
    language = cut(text_config["text_config"], layers, "num_hidden_layers")
    language["layer_types"] = language["layer_types"][: language["num_hidden_layers"]]
    if layers:  # the vision tower does not run on text; cut so that it costs no memory
        text_config["vision_config"].update(depth=1, fullatt_block_indexes=[0])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text_config))
    transformer_config = cut(read_config("qwen-image", "transformer"), layers, "num_layers")
    denoiser = QwenImageTransformer2DModel.from_config(transformer_config)
    vae = ImageFrameVAE.from_config(read_config("qwen-image", "vae")).to(device, dtype).requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_config("qwen-image", "scheduler"))
    family = QwenImageFamily.from_modules(denoiser=denoiser.to(device), vae=vae, noise_scheduler=scheduler)
    vocab_size = text_config["text_config"]["vocab_size"]
    return Models(family, [], text_encoder.to(device, dtype).requires_grad_(False).eval(), (vocab_size, vocab_size))


def build_sana(layers: int, device: torch.device, dtype: torch.dtype) -> Models:
    text_config = Gemma2Config(**cut(read_config("sana", "text_encoder"), layers, "num_hidden_layers"))
    denoiser = SanaTransformer2DModel.from_config(cut(read_config("sana", "transformer"), layers, "num_layers"))
    vae = AutoencoderDC.from_config(read_config("sana", "vae")).to(device, dtype).requires_grad_(False)
    scheduler = flow_match_scheduler(read_config("sana", "scheduler"))
    family = SanaFamily.from_modules(denoiser=denoiser.to(device), vae=vae, noise_scheduler=scheduler)
    text_encoder = Gemma2Model(text_config).to(device, dtype).requires_grad_(False).eval()
    return Models(family, [], text_encoder, (text_config.vocab_size, text_config.vocab_size))


def encode_text(models: Models, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pipelines' text encoding on token ids (the tokenizers cost the same for both steps). Qwen-Image: the
    last hidden states of Qwen2.5-VL on the template and caption, without the template's first tokens; SANA:
    Gemma-2's last hidden states and the mask."""
    if isinstance(models.family, SanaFamily):
        mask = torch.ones_like(t5_ids)
        return {"prompt_embeds": models.t5(t5_ids, attention_mask=mask)[0], "prompt_attention_mask": mask}
    if isinstance(models.family, QwenImageFamily):
        mask = torch.ones_like(t5_ids)
        output = models.t5(input_ids=t5_ids, attention_mask=mask, output_hidden_states=True)
        return {
            "prompt_embeds": output.hidden_states[-1][:, QWEN_TEMPLATE_TOKENS:],
            "prompt_embeds_mask": mask[:, QWEN_TEMPLATE_TOKENS:],
        }
    t5_states = models.t5(t5_ids)[0]
    if len(models.clip_encoders) == 1:  # FLUX: T5 states, CLIP-L's pooled output
        return {
            "prompt_embeds": t5_states,
            "pooled_prompt_embeds": models.clip_encoders[0](clip_ids).pooler_output,
        }
    outputs = [encoder(clip_ids, output_hidden_states=True) for encoder in models.clip_encoders]
    clip_states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return {
        "prompt_embeds": torch.cat([clip_states, t5_states], dim=-2),
        "pooled_prompt_embeds": torch.cat([output.text_embeds for output in outputs], dim=-1),
    }


def make_trainable(denoiser: torch.nn.Module, trainable: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    denoiser.requires_grad_(trainable == "full")
    if trainable == "lora":
        denoiser.to(dtype=dtype)
        denoiser.add_adapter(
            LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        for parameter in denoiser.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return [parameter for parameter in denoiser.parameters() if parameter.requires_grad]


def baseline_velocity(
    model: str, transformer, noisy, sigmas, embeds: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The examples' transformer call: SD3 on the latent grid with timesteps σ·1000; FLUX on packed latents with
    image ids, text ids and guidance 1 (guidance-distilled checkpoints take it as an embedding); Qwen-Image on
    packed latents with ``img_shapes``, σ and the text mask; SANA on the latent grid with σ·1000 and the mask."""
    if model == "sana":
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_attention_mask=embeds["prompt_attention_mask"],
        ).sample
    if model == "sd3":
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
        ).sample
    batch, channels, height, width = noisy.shape
    if model == "qwen-image":
        output = transformer(
            hidden_states=QwenImagePipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=sigmas,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_hidden_states_mask=embeds["prompt_embeds_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
        ).sample
        return QwenImagePipeline._unpack_latents(output, height * 8, width * 8, 8).squeeze(2)
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(
        batch, height // 2, width // 2, noisy.device, noisy.dtype
    )
    states = embeds["prompt_embeds"]
    guidance = torch.ones(batch, device=noisy.device) if transformer.config.guidance_embeds else None
    output = transformer(
        hidden_states=packed,
        timestep=sigmas,
        guidance=guidance,
        pooled_projections=embeds["pooled_prompt_embeds"],
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=image_ids,
    ).sample
    return FluxPipeline._unpack_latents(output, height * 8, width * 8, 8)


def baseline_latents(model: str, vae, pixels: torch.Tensor) -> torch.Tensor:
    """The examples' VAE encoding: ``(x − shift)·scale``; Qwen-Image's video VAE on one frame, per channel
    ``(x − mean_c)·(1/std_c)``; SANA's DC-AE ``latent · scale``."""
    if model == "sana":
        return vae.encode(pixels.to(vae.dtype)).latent * vae.config.scaling_factor
    if model != "qwen-image":
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor
    latents = vae.encode(pixels.to(vae.dtype).unsqueeze(2)).latent_dist.sample()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    return ((latents - mean) * inverse_std).squeeze(2)


def baseline_step(model: str, models: Models, ref_transformer, optimizer, pixels, clip_ids, t5_ids, autocast):
    family, transformer = models.family, models.family.denoiser
    with torch.no_grad(), autocast():
        latents = baseline_latents(model, family.vae, pixels)
        embeds = encode_text(models, clip_ids, t5_ids)
    pairs = latents.shape[0] // 2
    noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
    u = compute_density_for_timestep_sampling(DENSITY[model], pairs, logit_mean=0.0, logit_std=1.0)
    scheduler = family.noise_scheduler
    indices = (u * scheduler.config.num_train_timesteps).long()
    sigmas = scheduler.sigmas.to(latents.device)[indices].repeat(2)
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    both = {name: torch.cat([value, value]) for name, value in embeds.items()}
    target = (noise - latents).float()
    with autocast():
        model_error = (baseline_velocity(model, transformer, noisy, sigmas, both).float() - target).pow(2)
        with torch.no_grad():
            ref_velocity = baseline_velocity(model, ref_transformer, noisy, sigmas, both).float()
    model_error = model_error.mean(dim=(1, 2, 3))
    ref_error = (ref_velocity - target).pow(2).mean(dim=(1, 2, 3))
    model_w, model_l = model_error.chunk(2)
    ref_w, ref_l = ref_error.chunk(2)
    loss = -F.logsigmoid(-0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def our_step(method: DiffusionDPO, denoiser, optimizer, batch: LatentPairBatch, autocast) -> torch.Tensor:
    with autocast():
        scores, _ = method.pair_scores(denoiser, batch)
    loss = compute_loss(scores, LossConfig(beta=BETA)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_baseline(
    args, models: Models, trainable: str, parameters, inputs, autocast
) -> tuple[float, float]:
    """The baseline keeps a separate deep-copied reference transformer, as the DPO peers' scripts do."""
    dtype = next(models.family.vae.parameters()).dtype
    ref_transformer = copy.deepcopy(models.family.denoiser).requires_grad_(False).to(dtype)
    if trainable == "lora":
        ref_transformer.disable_adapters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    step = lambda: baseline_step(args.model, models, ref_transformer, optimizer, *inputs, autocast)  # noqa: E731
    return measure(step, torch.device(args.device), args.warmup, args.steps, count_flops=False)[:2]


def run(args, trainable: str) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    models = build_models(args.model, args.layers, device, dtype)
    family, denoiser = models.family, models.family.denoiser
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2 - 1
    clip_ids = torch.randint(0, models.vocab_sizes[0], (args.batch_size, 77), generator=generator)
    text_tokens = args.text_length + (QWEN_TEMPLATE_TOKENS if args.model == "qwen-image" else 0)
    t5_ids = torch.randint(0, models.vocab_sizes[1], (args.batch_size, text_tokens), generator=generator)
    pixels, clip_ids, t5_ids = pixels.to(device), clip_ids.to(device), t5_ids.to(device)
    parameters = make_trainable(denoiser, trainable, dtype)

    baseline = measure_baseline(args, models, trainable, parameters, (pixels, clip_ids, t5_ids), autocast)
    print(f"  {trainable} baseline: {1000 * baseline[0]:.1f} ms/step", flush=True)

    with torch.no_grad(), autocast():  # what the latent cache holds, encoded once
        latents = family.to_latents(family.encode(pixels).sample())
        embeds = encode_text(models, clip_ids, t5_ids)
    batch = LatentPairBatch(
        chosen_latents=latents[: args.batch_size].to(dtype),
        rejected_latents=latents[args.batch_size :].to(dtype),
        prompt_embeds={name: value.to(dtype) for name, value in embeds.items()},
        noise_seeds=list(range(args.batch_size)),
    )
    method = DiffusionDPO(family, ReferenceDenoiser(denoiser, frozen_copy=trainable == "full"))
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=device.type == "cuda")
    ours = measure(
        lambda: our_step(method, denoiser, optimizer, batch, autocast), device, args.warmup, args.steps, False
    )[:2]
    print(f"  {trainable} diffalign: {1000 * ours[0]:.1f} ms/step", flush=True)
    return [
        {"step": name, "trainable": trainable, "seconds": seconds, "peak": peak}
        for name, (seconds, peak) in (("baseline", baseline), ("diffalign", ours))
    ]


def main() -> None:
    parser = benchmark_parser(__doc__, models=list(FOLDERS))
    parser.set_defaults(model="sd3", batch_size=1)
    parser.add_argument(
        "--layers", type=int, default=1, help="blocks per transformer/text-encoder stack; 0: all"
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--text-length", type=int, default=32, help="T5 tokens per prompt")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parse_benchmark_args(parser)
    if args.resolution % MULTIPLE[args.model]:
        parser.error(f"--resolution must be a multiple of {MULTIPLE[args.model]} for {args.model} (pixels per token)")

    rows = [row for trainable in trainables(args) for row in run(args, trainable)]
    print(
        f"\nFlow Diffusion-DPO step, model={args.model} ({FOLDERS[args.model]}, layers={args.layers or 'all'}) "
        f"resolution={args.resolution} pairs/step={args.batch_size} on {machine(args.device)}"
    )
    print(f"{'trainable':<10}{'step':<12}{'ms/step':>10}{'pairs/s':>10}{'peak GiB':>10}{'vs baseline':>13}")
    for row in rows:
        baseline = next(r for r in rows if r["trainable"] == row["trainable"] and r["step"] == "baseline")
        print(
            f"{row['trainable']:<10}{row['step']:<12}{1000 * row['seconds']:>10.1f}"
            f"{args.batch_size / row['seconds']:>10.2f}{row['peak']:>10.2f}"
            f"{baseline['seconds'] / row['seconds']:>12.2f}×"
        )
    write_record(args, rows, {"torch": torch.__version__, "diffusers": diffusers.__version__})


if __name__ == "__main__":
    main()
