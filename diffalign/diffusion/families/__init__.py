"""Model families: one module each; ``load_family`` picks one from the pipeline's ``model_index.json``."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from diffalign.diffusion.families.ace_step import AceStepFamily
from diffalign.diffusion.families.audioldm2 import AudioLDM2Family
from diffalign.diffusion.families.base import (
    DDPMFamily,
    DiffusionFamily,
    FamilyOptions,
    LatentNormalization,
    Posterior,
)
from diffalign.diffusion.families.flux import FluxFamily
from diffalign.diffusion.families.flux2 import Flux2KleinFamily
from diffalign.diffusion.families.musicldm import AudioLDMFamily, MusicLDMFamily
from diffalign.diffusion.families.qwen_image import QwenImageFamily
from diffalign.diffusion.families.sana import SanaFamily
from diffalign.diffusion.families.sd3 import StableDiffusion3Family
from diffalign.diffusion.families.stable_audio import StableAudioFamily
from diffalign.diffusion.families.stable_diffusion import StableDiffusionFamily, StableDiffusionXLFamily
from diffalign.diffusion.timesteps import TimestepSettings

# Pipeline class named in model_index.json → family class.
FAMILIES: dict[str, type[DiffusionFamily]] = {
    "StableDiffusionPipeline": StableDiffusionFamily,
    "StableDiffusionXLPipeline": StableDiffusionXLFamily,
    "MusicLDMPipeline": MusicLDMFamily,
    "AudioLDMPipeline": AudioLDMFamily,
    "AudioLDM2Pipeline": AudioLDM2Family,
    "StableAudioPipeline": StableAudioFamily,
    "StableDiffusion3Pipeline": StableDiffusion3Family,
    "FluxPipeline": FluxFamily,
    "Flux2KleinPipeline": Flux2KleinFamily,
    "QwenImagePipeline": QwenImageFamily,
    "SanaPipeline": SanaFamily,
    "AceStepPipeline": AceStepFamily,
}


def family_class(pretrained_path: str) -> type[DiffusionFamily]:
    """The family of a diffusers pipeline directory (or hub id), from its ``model_index.json`` alone."""
    try:
        pipeline_class = DiffusionPipeline.load_config(pretrained_path)["_class_name"]
    except OSError as error:
        raise FileNotFoundError(
            f"model.pretrained: cannot read model_index.json from {pretrained_path!r} ({error}); give a diffusers "
            "pipeline directory, or a hub id while online"
        ) from None
    if pipeline_class not in FAMILIES:
        raise ValueError(
            f"{pretrained_path}: pipeline class {pipeline_class!r} has no model family; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[pipeline_class]


def load_family(
    pretrained_path: str,
    vae_path: str | None = None,
    timesteps: TimestepSettings | None = None,
    options: FamilyOptions | None = None,
) -> DiffusionFamily:
    """Load every component of a diffusers pipeline directory (or hub id) into its family."""
    family = family_class(pretrained_path)
    return family(pretrained_path, vae_path=vae_path, timesteps=timesteps, options=options)


__all__ = [
    "FAMILIES",
    "DDPMFamily",
    "DiffusionFamily",
    "FamilyOptions",
    "LatentNormalization",
    "Posterior",
    "family_class",
    "load_family",
]
