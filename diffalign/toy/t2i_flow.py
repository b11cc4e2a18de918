"""The toy text-to-image world on a Stable Diffusion 3 architecture: ``assets/toy-t2i-flow``.

The same scenes and captions as ``assets/toy-t2i`` (:mod:`diffalign.toy.t2i_build`), modelled the way SD3 models
images (Esser et al., "Scaling Rectified Flow Transformers", arXiv 2403.03206). What toy-t2i already has is reused:

1. its toy CLIP's text tower with the CLIP text projection, as both of SD3's CLIP encoders (``text_encoder`` and
   ``text_encoder_2``: penultimate states concatenated on channels, pooled outputs concatenated); T5 is left out
   as SD3 allows (the pipeline feeds zeros in its place). Its tokenizer pads to 16 tokens instead of 77: the text
   tower is causal, so the first 16 states are exactly those of a 77-token pass, and the context stays short;
2. its VAE (32×32×3 ↔ 8×8×4), given a ``shift_factor`` and ``scaling_factor`` from the mean and standard deviation
   of the scenes' latents, as SD3's factors were computed;
3. an ``SD3Transformer2DModel`` trained with the rectified-flow objective of the SD3 family (logit-normal σ on the
   shifted training grid, velocity target ``ε − x0``, :class:`StableDiffusion3Family`) on toy-t2i's scenes, with
   10% empty captions for classifier-free guidance; ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1;
4. the ``StableDiffusion3Pipeline`` saved in the standard layout, then preference data sampled from it and labelled
   by the toy reward, and the checker's quality on those samples, exactly as toy-t2i's.

The T5 states the pipeline substitutes are ``max_sequence_length`` zero tokens; the transformer is trained with
``T5_TOKENS`` of them, so sample with ``max_sequence_length=T5_TOKENS`` (``model.max_text_length`` in configs).

Run it with ``python -m diffalign.toy build t2i-flow`` (after ``build t2i``, whose CLIP and VAE it reads).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import Tensor, nn
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.diffusion.families.sd3 import StableDiffusion3Family
from diffalign.toy import t2i
from diffalign.toy.stages import BuildStages, write_build_info
from diffalign.toy.t2i_build import (
    DenoiserTraining,
    ImageBuildSettings,
    encode_scenes,
    train_denoiser,
    training_captions,
    write_preference_data,
)

TOY_T2I_FLOW_DIR = t2i.TOY_T2I_DIR.parent / "toy-t2i-flow"
"""Where the built flow toy lives in a source checkout."""

CLIP_TOKENS = 16  # every caption and subject prompt of the toy world fits (at most 8 tokens)
T5_TOKENS = 8  # zero states standing in for T5, as many as the transformer is trained with


@dataclass
class T2IFlowBuildConfig(ImageBuildSettings):
    """The transformer's size and training. The defaults build the shipped asset (``assets/README.md``)."""

    transformer_layers: int = 4
    transformer_width: int = 64
    attention_heads: int = 2
    transformer_steps: int = 9000
    transformer_batch_size: int = 64
    transformer_learning_rate: float = 1e-3
    transformer_ema_decay: float = 0.998
    # σ-shift of the schedule, σ' = sσ/(1 + (s − 1)σ). SD3 uses 3 for 128×128 latents; the paper's shift grows with
    # the pixel count, and on 8×8 latents none is needed.
    scheduler_shift: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.transformer_ema_decay < 1:
            raise ValueError(f"transformer_ema_decay must be in [0, 1), got {self.transformer_ema_decay!r}")
        if self.transformer_width % self.attention_heads:
            raise ValueError(
                f"transformer_width ({self.transformer_width}) must be a multiple of attention_heads "
                f"({self.attention_heads})"
            )
        if not self.scheduler_shift > 0:
            raise ValueError(f"scheduler_shift must be > 0, got {self.scheduler_shift!r}")

    @property
    def transformer_training(self) -> DenoiserTraining:
        return DenoiserTraining(
            self.transformer_steps,
            self.transformer_batch_size,
            self.transformer_learning_rate,
            self.transformer_ema_decay,
        )


def text_encoder_with_projection(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The toy CLIP's text tower and text projection as one model, the class of SD3's CLIP encoders."""
    text_config = copy.deepcopy(clip.config.text_config)
    text_config.projection_dim = clip.config.projection_dim
    encoder = CLIPTextModelWithProjection(text_config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return encoder.eval()


def latent_factors(latent_sample: torch.Tensor) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` that map the latents to zero mean and unit variance: the factors of
    SD3's VAE were computed so, over its training latents (1.5305 and 0.0609)."""
    shift_factor = latent_sample.mean().item()
    return round(1 / (latent_sample - shift_factor).std().item(), 4), round(shift_factor, 4)


def make_transformer(config: T2IFlowBuildConfig, text_width: int, pooled_width: int) -> SD3Transformer2DModel:
    """A tiny MMDiT for 8×8×4 latents in 2×2 patches (16 image tokens), SD3.5's RMS-normalised queries and keys."""
    return SD3Transformer2DModel(
        sample_size=t2i.RESOLUTION // 4,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=config.transformer_layers,
        attention_head_dim=config.transformer_width // config.attention_heads,
        num_attention_heads=config.attention_heads,
        joint_attention_dim=text_width,
        caption_projection_dim=config.transformer_width,
        pooled_projection_dim=pooled_width,
        pos_embed_max_size=t2i.RESOLUTION // 8,
        qk_norm="rms_norm",
    )


def load_text_side(source_dir: Path) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    """toy-t2i's CLIP text encoder with its projection, and its tokenizer padding to ``CLIP_TOKENS``."""
    clip = CLIPModel.from_pretrained(source_dir / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(source_dir / "tokenizer", model_max_length=CLIP_TOKENS)
    return text_encoder_with_projection(clip), tokenizer


def require_toy_t2i(source_dir: Path) -> None:
    if not (source_dir / "clip").is_dir() or not (source_dir / "vae").is_dir():
        raise FileNotFoundError(
            f"{source_dir} lacks the toy CLIP or VAE that the flow toy reuses; build it first with "
            "`python -m diffalign.toy build t2i`"
        )


def assemble_pipeline(
    config: T2IFlowBuildConfig, vae: AutoencoderKL, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer
) -> StableDiffusion3Pipeline:
    """A fresh SD3 transformer with toy-t2i's VAE and its CLIP text tower as both CLIP encoders (no T5)."""
    width = text_encoder.config.hidden_size
    return StableDiffusion3Pipeline(
        transformer=make_transformer(config, text_width=2 * width, pooled_width=2 * width),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.scheduler_shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def sd3_conditioning(pipeline: StableDiffusion3Pipeline, texts: list[str]) -> dict[str, Tensor]:
    """The transformer's text inputs for ``texts``, as the SD3 family computes them: the pipeline's own
    ``encode_prompt``."""
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        texts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
    )
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}


def build_toy_t2i_flow(
    output_dir: str | Path,
    seed: int = 0,
    config: T2IFlowBuildConfig | None = None,
    source_dir: str | Path | None = None,
) -> dict:
    """Build the SD3-architecture toy into ``output_dir`` from toy-t2i's CLIP and VAE in ``source_dir`` (default:
    ``toy-t2i`` next to ``output_dir``); returns (and saves as ``build_info.json``) timings, sizes, the latent
    factors and the checker's accuracy on the pipeline's samples."""
    config = config or T2IFlowBuildConfig()
    output_dir = Path(output_dir)
    source_dir = Path(source_dir) if source_dir is not None else output_dir.parent / "toy-t2i"
    require_toy_t2i(source_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    stages = BuildStages("t2i-flow", seed)
    generator = stages.generator

    with stages.stage("scenes and latents"):
        scenes = t2i.sample_scenes(config.scenes, generator(1))
        text_encoder, tokenizer = load_text_side(source_dir)
        vae = AutoencoderKL.from_pretrained(source_dir / "vae")
        latent_means, latent_stds = encode_scenes(vae, scenes.images)
        latent_sample = latent_means + latent_stds * torch.randn(latent_means.shape, generator=generator(5))
        scaling_factor, shift_factor = latent_factors(latent_sample)
        vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)

    with stages.stage("transformer", init_seed=2):
        pipeline = assemble_pipeline(config, vae, text_encoder, tokenizer)
        captions = training_captions(scenes, config, generator(6))
        pipeline.transformer = train_transformer(pipeline, captions, latent_means, latent_stds, config, generator(7))

    with stages.stage("preference data"):
        pipeline.save_pretrained(output_dir)
        # The preference data come from the pipeline exactly as saved and loaded (without T5, as diffusers loads
        # SD3 without it).
        pipeline = StableDiffusion3Pipeline.from_pretrained(output_dir, text_encoder_3=None, tokenizer_3=None)
        pipeline.set_progress_bar_config(disable=True)
        quality = write_preference_data(
            functools.partial(pipeline, max_sequence_length=T5_TOKENS), output_dir, config, stages
        )

    return write_build_info(
        output_dir,
        stages,
        config,
        ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "data"),
        quality,
        latents={"scaling_factor": scaling_factor, "shift_factor": shift_factor},
        sampling={
            "scheduler": "FlowMatchEulerDiscrete",
            "shift": config.scheduler_shift,
            "steps": config.sampling_steps,
            "guidance_scale": config.guidance_scale,
            "max_sequence_length": T5_TOKENS,
        },
    )


def train_transformer(
    pipeline: StableDiffusion3Pipeline,
    captions: list[str],
    latent_means: Tensor,
    latent_stds: Tensor,
    config: T2IFlowBuildConfig,
    generator: torch.Generator,
) -> nn.Module:
    """The pipeline's fresh transformer trained on the scenes' VAE posteriors (normalised by the factors its VAE
    config holds), each under its caption."""
    texts = sorted(set(captions))
    vae_config = pipeline.vae.config
    return train_denoiser(
        StableDiffusion3Family.from_modules(noise_scheduler=pipeline.scheduler),
        pipeline.transformer,
        (latent_means - vae_config.shift_factor) * vae_config.scaling_factor,
        latent_stds * vae_config.scaling_factor,
        sd3_conditioning(pipeline, texts),
        torch.tensor([texts.index(caption) for caption in captions]),
        config.transformer_training,
        generator,
    )


def build(output_dir: str | Path, seed: int = 0) -> None:
    """Build the flow toy into ``output_dir`` from the toy-t2i build beside it."""
    build_toy_t2i_flow(output_dir, seed)
