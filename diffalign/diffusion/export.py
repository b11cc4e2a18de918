"""Writing a trained denoiser in the formats stock diffusers tools load.

A full fine-tune becomes a pipeline folder: ``DiffusionPipeline.from_pretrained(final)`` loads it. The trained
denoiser is written in its sub-folder (``unet/`` or ``transformer/``); every other component comes from the base
pipeline (the replacement VAE of ``model.vae`` where one was trained with): weight files are *hard-linked* to the
base's (no extra disk space, and the folder stays complete if the base is deleted or moved), copied where the
two folders lie on different filesystems; the small files (configs, tokenizers, ``model_index.json``) are copied,
so that editing them never changes the base. Weight files are shared with the base, so replace them rather than
edit them in place. A hub base is read from the local Hugging Face cache, where training downloaded it.

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

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from peft.utils import get_peft_model_state_dict
from torch import nn

from diffalign.config import from_dict
from diffalign.diffusion.config import DiffusionModelConfig, DiffusionTrainConfig
from diffalign.diffusion.families import DiffusionFamily, load_family
from diffalign.diffusion.models import make_trainable
from diffalign.model_card import CardFacts
from diffalign.training.checkpoint_model import CheckpointModel, assign_weights

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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".gguf")


def save_denoiser(model: nn.Module, family: DiffusionFamily, config: DiffusionModelConfig, output_dir: Path) -> None:
    """A LoRA file with its adapter settings, or a pipeline folder around the full denoiser."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.trainable == "lora":
        save_lora(model, family.denoiser_subfolder, output_dir)
        return
    model.save_pretrained(output_dir / family.denoiser_subfolder)
    replacements = {"vae": local_folder(config.vae)} if config.vae else {}
    link_pipeline(local_folder(config.pretrained), output_dir, family.denoiser_subfolder, replacements)


def local_folder(path_or_hub_id: str) -> Path:
    """A local pipeline or component folder, or the cached snapshot of a hub id."""
    if Path(path_or_hub_id).is_dir():
        return Path(path_or_hub_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_hub_id, local_files_only=True))
    except Exception as error:  # not cached, or not a valid id
        raise FileNotFoundError(
            f"{path_or_hub_id!r} is neither a local folder nor in the Hugging Face cache ({error}); the pipeline "
            "folder of a full fine-tune is built from the base model's files"
        ) from None


def link_pipeline(base: Path, output_dir: Path, trained: str, replacements: dict[str, Path]) -> None:
    """The base pipeline's ``model_index.json`` and component folders into ``output_dir``, all but ``trained``
    (already written); ``replacements`` maps a component to the folder it comes from instead."""
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"{base} has no model_index.json, so it is no diffusers pipeline folder to build on")
    shutil.copyfile(base / "model_index.json", output_dir / "model_index.json")
    for component in sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if component != trained:
            link_tree(replacements.get(component, base / component), output_dir / component)


def link_tree(source: Path, target: Path) -> None:
    """Every file under ``source`` into ``target``: weights hard-linked (copied across filesystems), the rest
    copied."""
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # hub caches hold symbolic links into their blob store
        if destination.exists():
            destination.unlink()
        if path.name.endswith(WEIGHT_SUFFIXES):
            try:
                os.link(real, destination)
                continue
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
        shutil.copyfile(real, destination)


def denoiser_card_facts(family: DiffusionFamily, trainable: str) -> CardFacts:
    """How the model card says to load a final folder of ``family``."""
    pipeline = family.pipeline_class.__name__
    if trainable == "lora":
        load = (
            "pipeline.load_lora_weights(FOLDER)"
            if hasattr(family.pipeline_class, "load_lora_weights")
            else f'pipeline.{family.denoiser_subfolder}.load_lora_adapter(FOLDER, prefix="{family.denoiser_subfolder}")'
        )
        usage = (
            f"from diffusers import {pipeline}\n\n"
            f"pipeline = {pipeline}.from_pretrained(BASE_MODEL)\n"
            f"{load}  # the adapter's alpha and target modules come with the file"
        )
    else:
        usage = "from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained(FOLDER)"
    return CardFacts(library="diffusers", pipeline_tag=family.hub_pipeline_tag, usage=usage)


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


def load_trained_denoiser(family: DiffusionFamily, config: DiffusionModelConfig, checkpoint: CheckpointModel) -> nn.Module:
    """``family.denoiser`` made as training made it (a LoRA added, or all of it) holding the checkpoint's weights."""
    make_trainable(family.denoiser, config)
    return assign_weights(family.denoiser, checkpoint.weights, checkpoint.path)


def export_checkpoint(checkpoint: CheckpointModel, output_dir: Path) -> CardFacts:
    """Write a diffusion checkpoint's model into ``output_dir`` as ``final/`` holds it; returns its card facts."""
    config = from_dict(DiffusionTrainConfig, checkpoint.settings)
    model = config.model
    family = load_family(model.pretrained, model.vae, config.timesteps, model.family_options())
    denoiser = load_trained_denoiser(family, model, checkpoint)
    save_denoiser(denoiser, family, model, output_dir)
    return denoiser_card_facts(family, model.trainable)
