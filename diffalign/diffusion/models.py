"""The models of a diffusion run: the family's components on the device, the trainable denoiser (LoRA or full,
fp32 masters over low-precision frozen weights) and its reference."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from diffalign.diffusion.config import DiffusionModelConfig, DiffusionTrainConfig
from diffalign.diffusion.families import DiffusionFamily, load_family
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.hub import check_source, loading
from diffalign.training.precision import mixed_precision_dtype, upcast_trainable


def make_trainable(denoiser: nn.Module, config: DiffusionModelConfig) -> None:
    """Freeze ``denoiser``, then unfreeze all of it (``trainable: full``) or add a LoRA adapter to it."""
    denoiser.requires_grad_(False)
    if config.trainable == "full":
        denoiser.requires_grad_(True)
    else:
        denoiser.add_adapter(config.lora.peft_config())


def build_models(
    config: DiffusionTrainConfig, accelerator: Accelerator
) -> tuple[DiffusionFamily, ReferenceDenoiser, ReferenceDenoiser | None]:
    """The family (denoiser trainable, everything else frozen, on the device), the reference and, with TR-DPO's
    ``model.reference_sync_steps``, a second frozen copy for the loss that moves towards the policy.

    The reference is built even for reference-free losses: evaluation samples the base model through it. With
    LoRA it is the policy with its adapters off; a full fine-tune gets a frozen copy (``model.reference``).
    """
    model = config.model
    device, weight_dtype = accelerator.device, mixed_precision_dtype(accelerator.mixed_precision)
    if model.vae:
        check_source("model.vae", model.vae)
    with loading("model.pretrained", model.pretrained, "diffusers pipeline"):
        family = load_family(model.pretrained, model.vae, config.timesteps, model.family_options())
    for module in family.frozen_modules().values():
        module.requires_grad_(False).eval()
    vae_dtype = torch.float32 if family.vae_needs_fp32 else weight_dtype
    family.to(device, weight_dtype, vae_dtype=vae_dtype)

    denoiser = family.denoiser
    make_trainable(denoiser, model)
    if model.trainable == "lora":
        denoiser.to(device, dtype=weight_dtype)
        upcast_trainable(denoiser)
    if config.run.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if model.channels_last:
        denoiser.to(memory_format=torch.channels_last)

    reference_mode = model.reference
    if reference_mode == "auto":
        reference_mode = "adapter_disabled" if model.trainable == "lora" else "frozen_copy"
    reference = ReferenceDenoiser(
        denoiser, frozen_copy=reference_mode == "frozen_copy", offload_to_cpu=model.offload_reference
    )
    synced = None
    if model.reference_sync_steps is not None:
        synced = ReferenceDenoiser(denoiser, frozen_copy=True, offload_to_cpu=model.offload_reference)
    frozen_copies = [ref.copy for ref in (reference, synced) if ref is not None and ref.copy is not None]
    for frozen in frozen_copies:
        frozen.to(dtype=weight_dtype)
    if model.compile:
        # After the frozen copies are made: a deep copy of a compiled module would call the original's forward.
        # Compiled in place, so parameter names, checkpoints and exported files stay those of the module.
        settings = {"mode": model.compile_mode, "backend": model.compile_backend}
        denoiser.compile(**settings)
        for frozen in frozen_copies:
            frozen.compile(**settings)
    return family, reference, synced
