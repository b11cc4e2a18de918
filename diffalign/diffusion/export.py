"""Writing a trained denoiser in the formats stock diffusers tools load.

A LoRA goes into ``pytorch_lora_weights.safetensors`` as diffusers' LoRA loaders write it: keys
``<denoiser subfolder>.<module>.lora_A/lora_B.weight`` and, in the file's metadata, the adapter's settings (rank,
alpha, target modules) under the same prefix. ``pipeline.load_lora_weights`` reads both where the pipeline has a
LoRA loader, ``denoiser.load_lora_adapter(folder, prefix=<subfolder>)`` everywhere else. Without the metadata a
loader infers the rank from the weights and assumes alpha = rank, so a LoRA trained with any other alpha would
load at the wrong strength (scale 1 instead of alpha / rank).

The keys stay in PEFT's naming: converted to the old diffusers naming (``lora.down``), diffusers 0.42's loader
silently drops the attention projections' adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peft.utils import get_peft_model_state_dict
from torch import nn

if TYPE_CHECKING:
    from diffalign.diffusion.families import DiffusionFamily

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The LoraConfig fields that decide what a loaded adapter computes; the rest of peft's config (version, task type,
# initialisation) would only tie the file to one peft release.
_ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
                   "alpha_pattern", "bias")


def lora_adapter_metadata(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The settings of ``model``'s adapter that a loader needs to rebuild it at the trained strength."""
    settings = model.peft_config[adapter_name].to_dict()
    metadata = {name: settings[name] for name in _ADAPTER_FIELDS if name in settings}
    if isinstance(metadata.get("target_modules"), set):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata


def save_denoiser(
    model: nn.Module, family: DiffusionFamily, trainable: Literal["lora", "full"], output_dir: Path
) -> None:
    """A LoRA file with its adapter settings, or the full denoiser in its sub-folder (``from_pretrained``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainable == "lora":
        save_lora(model, family.denoiser_subfolder, output_dir)
    else:
        model.save_pretrained(output_dir / family.denoiser_subfolder)


def save_lora(model: nn.Module, prefix: str, output_dir: Path) -> Path:
    """``model``'s LoRA weights and settings under ``prefix`` (the pipeline's name for the denoiser)."""
    from diffusers.loaders.lora_base import LoraBaseMixin, _pack_dict_with_prefix

    LoraBaseMixin.write_lora_layers(
        LoraBaseMixin.pack_weights(get_peft_model_state_dict(model), prefix),
        str(output_dir),
        is_main_process=True,
        weight_name=LORA_WEIGHT_NAME,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=_pack_dict_with_prefix(lora_adapter_metadata(model), prefix),
    )
    return output_dir / LORA_WEIGHT_NAME
