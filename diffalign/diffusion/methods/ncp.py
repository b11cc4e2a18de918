"""NCP: preference optimisation in the U-Net's noise-conditioned embedding space (Gambashidze, Kulikov, Sosnin,
Makarov, "Aligning Diffusion Models with Noise-Conditioned Perception", arXiv 2406.17636; code
sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception, ``src/train/train_SDXL.py``).

Diffusion-DPO compares predictions with targets in latent space. NCP compares them after a perceptual encoder
E: the first half of a frozen copy of the *pretrained* denoiser (``conv_in`` and the down blocks, optionally
the mid block), which sees the prompt (and SDXL's added conditions) and a timestep. Per sample:

1. noise both members with a shared ε and t; predict with the policy (and, under ``no_grad``, the reference);
2. turn each prediction into a latent (``ncp.encoded_latent``):
   ``previous_step`` (official default): one DDPM sampler step from x_t to x_{t−1} (posterior mean from x̂0
   plus σ_t·z, z shared within a pair), encoded at t−1; the target is the same step from the true x0;
   ``clean_at_zero``: x̂0 encoded at t = 0; ``clean_at_random_t``: x̂0 encoded at a fresh uniform t
   (shared within a pair); the target is x0;
3. error = ``feature_error_weight`` · mean (E(latent) − E(target latent))², plus, with
   ``add_latent_error`` (the official ``--method both``), the usual latent MSE of the prediction;
4. scores ``−½·error`` into the loss core: ``sigmoid`` (DPO), ``cpo`` (no reference), ``sft``, ``orpo``,
   ``hinge``, ``ipo``.

The official DPO loss −log σ(β'·[(Lref_w − Lref_l) − (Lθ_w − Lθ_l)]) has no ½, so its β' = 2500 is our β = 5000
(the same factor 2 maps its hinge and CPO β).

Two details differ from the official code: at t = 0 the DDPM step lands on x̂0 (ᾱ_{−1} = 1, as diffusers'
``DDPMScheduler.step``) instead of returning x_t unchanged; x̂0 is never clipped. The encoder is a copy of the
denoiser made when the method is built, with any LoRA layers removed: the pretrained weights, before training.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.inversion import alpha_at, split_prediction
from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    pair_noise,
    per_sample_mse,
    register_method,
)
from diffalign.diffusion.methods.dpo import scores_from_errors
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import PairScores

# A pair's DDPM-step noise and random encoder timestep draw from their own stream, apart from ε and t.
STEP_STREAM = 1 << 61


class _EncoderDone(Exception):
    """Raised by the hook on the last encoder block: nothing after it needs to run."""


class DenoiserFeatures:
    """E(x, t, c): states of a frozen copy of ``denoiser``'s encoder half, flattened to ``[N, D]``.

    ``output``: the last down block's output (official default) or the mid block's. ``concatenate``: every
    state from ``conv_in`` on, concatenated; ``normalize`` scales each by (size of the last state)/(its size),
    as the official ``--normalize_intermediate_steps`` (which scales channels after reshaping every state to the
    smallest resolution: the same numbers, and the MSE does not depend on the layout).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        output: Literal["down", "mid"] = "down",
        concatenate: bool = False,
        normalize: bool = False,
    ) -> None:
        if not all(hasattr(denoiser, name) for name in ("conv_in", "down_blocks", "mid_block")):
            raise ValueError(
                f"method.name: ncp encodes with a U-Net's conv_in/down_blocks/mid_block, which "
                f"{type(denoiser).__name__} does not have; use a U-Net model family"
            )
        self.model = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if getattr(self.model, "peft_config", None):
            self.model.unload_lora()  # diffusers' PEFT integration: back to the base (pretrained) weights
        # The forward stops after the last captured block; the decoder half never runs.
        self.model.up_blocks = nn.ModuleList()
        self.blocks = [self.model.conv_in, *self.model.down_blocks]
        if output == "mid":
            self.blocks.append(self.model.mid_block)
        self.concatenate = concatenate
        self.normalize = normalize

    def __call__(
        self, family: DiffusionFamily, latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        self.model.to(latents.device, latents.dtype)
        states: list[Tensor] = []

        def capture(module: nn.Module, args: Any, output: Any) -> None:
            states.append(output[0] if isinstance(output, tuple) else output)  # down blocks return (h, skips)
            if module is self.blocks[-1]:
                raise _EncoderDone

        handles = [block.register_forward_hook(capture) for block in self.blocks]
        try:
            family.predict(self.model, latents, timesteps, inputs)
        except _EncoderDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not self.concatenate:
            return states[-1].flatten(1)
        flat = [state.flatten(1) for state in states]
        if self.normalize:
            flat = [state * (flat[-1].shape[1] / state.shape[1]) for state in flat]
        return torch.cat(flat, dim=1)


def ddpm_step(
    clean: Tensor, noisy: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, noise: Tensor
) -> Tensor:
    """One DDPM sampler step x_t → x_{t−1} from a clean estimate x̂0, batched over per-sample t (fp32).

        x_{t−1} = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x̂0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t + σ_t·z,
        α_t = ᾱ_t/ᾱ_{t−1},  β_t = 1 − α_t,  σ_t² = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t  (0 at t = 0, where ᾱ_{−1} = 1)

    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239, Eqs. 6–7 (the "fixed_small"
    variance of diffusers' ``DDPMScheduler.step``).
    """
    shape = (-1, *([1] * (noisy.ndim - 1)))
    alpha = alpha_at(alphas_cumprod, timesteps).view(shape)
    alpha_previous = alpha_at(alphas_cumprod, timesteps - 1).view(shape)
    step_alpha = alpha / alpha_previous
    step_beta = 1 - step_alpha
    mean = (
        alpha_previous.sqrt() * step_beta * clean.float()
        + step_alpha.sqrt() * (1 - alpha_previous) * noisy.float()
    ) / (1 - alpha)
    variance = (1 - alpha_previous) / (1 - alpha) * step_beta
    return mean + variance.sqrt() * noise.float()


@dataclass
class NcpSettings:
    """NCP (methods/ncp.py): errors in the frozen pretrained U-Net's feature space. Defaults: the official code."""

    encoder_output: Literal["down", "mid"] = "down"  # the last down block's output, or the mid block's
    concatenate_states: bool = False  # every state from conv_in on, concatenated
    normalize_states: bool = False  # scale concatenated states by (size of the last)/(own size)
    # The latent encoded for a prediction: one DDPM step to t−1 (encoded at t−1), or x̂0 at t=0 / a random t.
    encoded_latent: Literal["previous_step", "clean_at_zero", "clean_at_random_t"] = "previous_step"
    feature_error_weight: float = 1.0
    add_latent_error: bool = False  # error = latent MSE + weighted feature MSE (the official `--method both`)

    def __post_init__(self) -> None:
        if self.normalize_states and not self.concatenate_states:
            raise ValueError(
                "method.ncp.normalize_states: true only applies to concatenated states; "
                "set method.ncp.concatenate_states: true or normalize_states: false"
            )
        if not self.feature_error_weight > 0:
            raise ValueError(f"method.ncp.feature_error_weight must be > 0, got {self.feature_error_weight}")


@register_method("ncp", settings=NcpSettings)
class NoiseConditionedPerception(PreferenceMethod):
    """Preference scores from errors in the frozen pretrained denoiser's feature space.

    The feature space is the U-Net encoder's: a transformer denoiser has no such half (no published analogue), so
    the method requires a U-Net family.
    """

    requires = frozenset({"ddpm_schedule", "unet_encoder"})
    scores_lengths = True  # the official code's ORPO: one unit per sample
    settings: NcpSettings

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: NcpSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.encoder = DenoiserFeatures(
            family.denoiser,
            output=self.settings.encoder_output,
            concatenate=self.settings.concatenate_states,
            normalize=self.settings.normalize_states,
        )

    def clean_estimate(self, prediction: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """x̂0 implied by a denoiser prediction (ε or v) at ``timesteps``, in fp32."""
        alpha = alpha_at(self.family.noise_scheduler.alphas_cumprod, timesteps).view(
            -1, *([1] * (noisy.ndim - 1))
        )
        clean, _ = split_prediction(prediction.float(), noisy.float(), alpha, self.family.prediction_type)
        return clean

    def encoded_latent(self, clean: Tensor, noisy: Tensor, timesteps: Tensor, step_noise: Tensor) -> Tensor:
        """The latent E sees for a clean estimate (x̂0, or the true x0 for the target), in ``noisy``'s dtype."""
        if self.settings.encoded_latent == "previous_step":
            clean = ddpm_step(clean, noisy, timesteps, self.family.noise_scheduler.alphas_cumprod, step_noise)
        return clean.to(noisy.dtype)

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        family = self.family
        latents = batch.both_latents()
        noise, timesteps = pair_noise(family, batch)
        step_batch = batch
        if batch.noise_seeds is not None:
            step_batch = dataclasses.replace(
                batch, noise_seeds=[seed ^ STEP_STREAM for seed in batch.noise_seeds]
            )
        step_noise, random_timesteps = pair_noise(family, step_batch)
        noise, timesteps = torch.cat([noise, noise]), timesteps.repeat(2)
        step_noise, random_timesteps = torch.cat([step_noise, step_noise]), random_timesteps.repeat(2)

        noisy = family.add_noise(latents, noise, timesteps)
        inputs = family.denoiser_inputs(batch.both_prompt_embeds(), batch.extras or {})
        encoder_timesteps = {
            "previous_step": (timesteps - 1).clamp(min=0),
            "clean_at_zero": torch.zeros_like(timesteps),
            "clean_at_random_t": random_timesteps,
        }[self.settings.encoded_latent]

        def errors(prediction: Tensor, target_features: Tensor) -> Tensor:
            latent = self.encoded_latent(
                self.clean_estimate(prediction, noisy, timesteps), noisy, timesteps, step_noise
            )
            features = self.encoder(family, latent, encoder_timesteps, inputs)
            error = self.settings.feature_error_weight * per_sample_mse(features, target_features)
            if self.settings.add_latent_error:
                error = error + per_sample_mse(prediction, family.target(latents, noise, timesteps))
            return error

        with torch.no_grad():
            target_latent = self.encoded_latent(latents.float(), noisy, timesteps, step_noise)
            target_features = self.encoder(family, target_latent, encoder_timesteps, inputs)
        policy_errors = errors(family.predict(denoiser, noisy, timesteps, inputs), target_features)
        reference_errors = None
        if self.reference is not None:
            with self.reference.use(latents.device) as reference:
                reference_errors = errors(
                    family.predict(reference, noisy, timesteps, inputs), target_features
                )
        scores, metrics = scores_from_errors(policy_errors, reference_errors, batch.label)
        # A diffusion sample is one unit, so length-normalised losses (orpo) read the plain per-sample scores.
        ones = torch.ones_like(scores.policy_chosen)
        return dataclasses.replace(scores, chosen_lengths=ones, rejected_lengths=ones), metrics
