"""The two models of an evaluation and their samples: the base pipeline, the aligned weights, generation.

The aligned model is found from what a training run writes (``<output_dir>/final/``: LoRA weights in diffusers
format or a pipeline folder, plus ``config.yaml``; or a checkpoint ``<output_dir>/checkpoints/step-N``, read
through its own config) or from a LoRA, denoiser or pipeline directory made elsewhere.
Sampling goes through the family (:func:`diffalign.diffusion.sampling.generate_samples`), so image and audio
families are sampled alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from diffalign.config import SourceNotFoundError, from_dict
from diffalign.diffusion.config import DiffusionModelConfig
from diffalign.diffusion.export import load_trained_denoiser
from diffalign.diffusion.families import DiffusionFamily, FamilyOptions
from diffalign.diffusion.sampling import generate_samples
from diffalign.progress import progress
from diffalign.rewards import Audio
from diffalign.training.checkpoint_model import is_checkpoint, read_checkpoint_config, read_checkpoint_model

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

Samples = Tensor | Audio


@dataclass(frozen=True)
class AlignedSource:
    """Where the aligned weights are, and the config of the run that trained them (``final/config.yaml``)."""

    directory: Path
    run_config: dict[str, Any] | None

    def base_model(self) -> tuple[str | None, str | None]:
        """``model.pretrained`` and ``model.vae`` of the training run, when the weights came with its config."""
        model = (self.run_config or {}).get("model") or {}
        return model.get("pretrained"), model.get("vae")

    def family_options(self) -> FamilyOptions:
        """The run's ``model:`` options (text encoders it dropped, text length, sample size), so that both models
        are sampled as the run sampled them; the defaults without a run config."""
        model = (self.run_config or {}).get("model")
        if not model:
            return FamilyOptions()
        return from_dict(DiffusionModelConfig, model, prefix="model.").family_options()


def locate_aligned(path: str) -> AlignedSource:
    """Resolve ``model.aligned``: a training output directory stands for its ``final/`` folder; a checkpoint
    brings its run's config."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise SourceNotFoundError(
            f"model.aligned: {directory} is not a local directory; give a training output directory, a checkpoint, "
            "a LoRA directory or a denoiser directory (download hub weights first: `hf download ORG/NAME "
            "--local-dir DIR`)"
        )
    if is_checkpoint(directory):
        return AlignedSource(directory, read_checkpoint_config(directory))
    if (directory / "final").is_dir():
        directory = directory / "final"
    config_path = directory / "config.yaml"
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    return AlignedSource(directory, run_config)


def load_aligned_denoiser(
    family: DiffusionFamily, directory: Path
) -> tuple[nn.Module, Literal["lora", "denoiser", "checkpoint"]]:
    """The aligned denoiser from ``directory``, on the device and in the dtype of the family's denoiser.

    LoRA weights (and a checkpoint's weights) are loaded into ``family.denoiser`` itself (and the text encoder,
    when a LoRA file has layers for it), so sample the base model first.
    """
    base = family.denoiser
    if is_checkpoint(directory):
        return checkpoint_denoiser(family, directory), "checkpoint"
    lora_file = next((directory / name for name in LORA_WEIGHT_NAMES if (directory / name).is_file()), None)
    if lora_file is not None:
        pipeline = family.build_pipeline(base)
        prefix = family.denoiser_subfolder
        # The pipeline's loader also converts other LoRA formats and loads text-encoder layers, but warns about
        # every text encoder a file has no layers for: a file of denoiser layers alone (what training writes)
        # goes straight to the denoiser, as do all files of pipelines without a LoRA loader (the audio ones).
        if hasattr(pipeline, "load_lora_weights") and not only_denoiser_layers(lora_file, prefix):
            pipeline.load_lora_weights(str(directory), weight_name=lora_file.name)
        else:
            base.load_lora_adapter(str(directory), weight_name=lora_file.name, prefix=prefix)
        return base, "lora"
    subfolder = family.denoiser_subfolder
    for candidate, sub in ((directory / subfolder, subfolder), (directory, None)):
        if (candidate / "config.json").is_file():
            parameter = next(base.parameters())
            denoiser = type(base).from_pretrained(str(directory), subfolder=sub)
            return denoiser.to(parameter.device, dtype=parameter.dtype).eval(), "denoiser"
    raise SourceNotFoundError(
        f"model.aligned: {directory} holds neither LoRA weights ({' or '.join(LORA_WEIGHT_NAMES)}) nor a denoiser "
        f"(config.json with weights, directly or in {subfolder}/)"
    )


def only_denoiser_layers(lora_file: Path, prefix: str) -> bool:
    """Whether every key of a safetensors LoRA file is a PEFT-named layer of the denoiser (``<prefix>.*``)."""
    if lora_file.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as weights:
        keys = list(weights.keys())
    return bool(keys) and all(key.startswith(f"{prefix}.") and ".lora_" in key for key in keys)


def checkpoint_denoiser(family: DiffusionFamily, directory: Path) -> nn.Module:
    """The denoiser of a training checkpoint (its EMA when the run kept one), built into ``family.denoiser``."""
    checkpoint = read_checkpoint_model(directory)
    if checkpoint.config.get("kind") != "diffusion":
        raise ValueError(f"model.aligned: {directory} is a checkpoint of a {checkpoint.config.get('kind')} run")
    parameter = next(family.denoiser.parameters())
    model_config = from_dict(DiffusionModelConfig, checkpoint.config["model"], prefix="model.")
    denoiser = load_trained_denoiser(family, model_config, checkpoint)
    return denoiser.to(parameter.device, dtype=parameter.dtype)


def sample_model(
    family: DiffusionFamily,
    denoiser: nn.Module,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
) -> Samples:
    """One sample per prompt through the family's sampler; sample ``i`` uses the generator seeded ``seed + i``.

    Images are kept as ``uint8 [N,3,H,W]`` (what a PNG holds) batch by batch, since a float copy of a large
    evaluation set would not fit in memory; audio comes back as :class:`Audio`.
    """
    chunks = []
    for start in progress(range(0, len(prompts), batch_size), desc="sampling", unit="batch"):
        samples = generate_samples(
            family,
            denoiser,
            prompts[start : start + batch_size],
            seed=seed + start,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
        )
        chunks.append(samples if isinstance(samples, Audio) else to_uint8(samples))
        logger.info("sampled %d/%d", min(start + batch_size, len(prompts)), len(prompts))
    if isinstance(chunks[0], Audio):
        return Audio(torch.cat([chunk.waveforms for chunk in chunks]), chunks[0].sample_rate)
    return torch.cat(chunks)


def to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def sample_slice(samples: Samples, start: int, stop: int) -> Tensor | Audio:
    """Samples ``start:stop`` as scorers take them: float images in [0,1], or audio."""
    if isinstance(samples, Audio):
        return samples[start:stop]
    return samples[start:stop].float() / 255
