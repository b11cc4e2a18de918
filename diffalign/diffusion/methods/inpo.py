"""DDIM-InPO (Lu et al., "InPO: Inversion Preference Optimization with Reparametrized DDIM for Efficient
Diffusion Model Alignment", CVPR 2025, arXiv 2503.18454; code JaydenLyh/InPO, ``train.py``).

Diffusion-DPO scores a pair on freshly noised latents x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. InPO instead treats the
model as a one-step generator of x0 from a latent that DDIM inversion ties to that very image:

1. x_t* = DDIM inversion of x0 along the scheduler's inference grid (``inpo.inversion_steps``, 10 as the
   official code) with jitter η·σ·N(0, I) after each step (``inpo.inversion_eta``, official 0.1), by the
   reference (default) or by the policy itself (``inpo.inversion_model: policy``, the official code), under
   ``no_grad``, for both members of every pair in one batch. The first step starts from the ᾱ that diffusers'
   ``DDIMInverseScheduler`` takes from the model's scheduler config, alphas_cumprod[0] for SD1.5 as in the
   official code (``inpo.inversion_start_alpha: scheduler``; ``one`` starts from ᾱ = 1);
2. ε* = (x_t* − √ᾱ_t·x0) / √(1−ᾱ_t), so that x_t* reads as a forward-process sample with noise ε*;
3. policy and reference errors on (x_t*, ε*) (or the v target built from ε*), scored ``−½·error`` as in
   Diffusion-DPO: with ``loss.type: [sigmoid]`` the official loss −log σ(−½β[(Lθ_w − Lref_w) − (Lθ_l − Lref_l)]).

Timestep grid: the official code inverts through the grid points strictly below the sampled t, so x_t* lies
on the largest grid point below t (grid spacing 100 with 10 steps), while ᾱ_t in step 2 and the denoiser's
timestep are those of t itself; ε* absorbs the mismatch. That is the default here.
``inpo.invert_to_exact_timestep: true`` adds one DDIM step from that grid point to t, so x_t* lies at t.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.inversion import ddim_invert, inversion_grid, inversion_start_alpha
from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    denoising_error,
    pair_noise,
    register_method,
)
from diffalign.diffusion.methods.dpo import scores_from_errors
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import PairScores

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig

# The inversion jitter of a pair draws from its own stream, apart from its diffusion noise and timestep.
JITTER_STREAM = 1 << 62


def reparametrised_noise(inverted: Tensor, latents: Tensor, alphas: Tensor) -> Tensor:
    """ε* = (x_t* − √ᾱ_t·x0) / √(1−ᾱ_t) in fp32 (``alphas`` ``[N]``, one ᾱ_t per sample)."""
    alphas = alphas.float().view(-1, *([1] * (latents.ndim - 1)))
    return (inverted.float() - alphas.sqrt() * latents.float()) / (1 - alphas).sqrt()


@dataclass
class InpoSettings:
    """DDIM-InPO (methods/inpo.py): how x_t* is obtained by DDIM inversion. Defaults: the official code's, but for
    ``inversion_model`` (the frozen reference by default; the shipped InPO configs set the official ``policy``)."""

    inversion_steps: int = 10  # points of the DDIM inference grid (spacing T / steps)
    inversion_eta: float = 0.1  # jitter η·σ·N(0, I) after each inversion step; 0 = deterministic inversion
    # reference: the frozen pretrained model inverts; policy: the model being trained (the official code).
    inversion_model: Literal["reference", "policy"] = "reference"
    # false (official): x_t* lands on the largest grid point below t; true: one more step to t itself.
    invert_to_exact_timestep: bool = False
    # ᾱ of the clean latent at the first inversion step. scheduler (official): diffusers' DDIMInverseScheduler
    # built from the model's scheduler config, alphas_cumprod[0] where it sets set_alpha_to_one: false (SD1.5,
    # SDXL); one: ᾱ = 1.
    inversion_start_alpha: Literal["scheduler", "one"] = "scheduler"

    def __post_init__(self) -> None:
        if self.inversion_steps < 1:
            raise ValueError(f"method.inpo.inversion_steps must be >= 1, got {self.inversion_steps}")
        if self.inversion_eta < 0:
            raise ValueError(f"method.inpo.inversion_eta must be >= 0, got {self.inversion_eta}")


@register_method("inpo", settings=InpoSettings)
class DDIMInPO(PreferenceMethod):
    """Preference scores on DDIM-inverted latents x_t* with reparametrised noise ε*; shared t within a pair."""

    requires = frozenset({"ddpm_schedule"})
    settings: InpoSettings

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: InpoSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.grid = inversion_grid(family.noise_scheduler.config, self.settings.inversion_steps)
        self.start_alpha = 1.0
        if self.settings.inversion_start_alpha == "scheduler":
            self.start_alpha = inversion_start_alpha(family.noise_scheduler.config)

    @classmethod
    def check_config(cls, config: DiffusionTrainConfig) -> None:
        if config.method.inpo.inversion_model == "reference" and not config.uses_reference:
            raise ValueError(
                "method.inpo.inversion_model: 'reference' needs a reference model, but loss.type "
                f"{config.loss.type} is reference-free so none is built; set method.inpo.inversion_model: policy"
            )

    def inversion_model(self, denoiser: nn.Module, device: torch.device) -> AbstractContextManager[nn.Module]:
        if self.settings.inversion_model == "policy":
            return nullcontext(denoiser)
        return self.reference.use(device)

    def invert(self, denoiser: nn.Module, batch: LatentPairBatch, timesteps: Tensor, inputs: dict) -> Tensor:
        """x_t* for ``[chosen; rejected]`` at ``timesteps`` ``[2B]``, in the latents' dtype."""
        family = self.family
        latents = batch.both_latents()
        generator = None
        if batch.noise_seeds is not None:
            pair_generators = [
                torch.Generator(latents.device).manual_seed(seed ^ JITTER_STREAM)
                for seed in batch.noise_seeds
            ]
            generator = pair_generators + pair_generators  # a pair's generator serves both of its members
        with self.inversion_model(denoiser, latents.device) as model:
            return ddim_invert(
                latents,
                lambda sample, levels: family.predict(model, sample, levels, inputs),
                family.noise_scheduler.alphas_cumprod,
                self.grid,
                timesteps,
                prediction_type=family.prediction_type,
                exact_timestep=self.settings.invert_to_exact_timestep,
                eta=self.settings.inversion_eta,
                generator=generator,
                start_alpha=self.start_alpha,
            )

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        family = self.family
        latents = batch.both_latents()
        _, timesteps = pair_noise(family, batch)
        timesteps = timesteps.repeat(2)
        inputs = family.denoiser_inputs(batch.both_prompt_embeds(), batch.extras or {})

        inverted = self.invert(denoiser, batch, timesteps, inputs)
        noise = reparametrised_noise(inverted, latents, family.alphas_cumprod(timesteps))
        target = family.target(latents.float(), noise, timesteps)

        policy_errors = denoising_error(family, denoiser, inverted, timesteps, target, inputs)
        reference_errors = None
        if self.reference is not None:
            with self.reference.use(latents.device) as reference:
                reference_errors = denoising_error(family, reference, inverted, timesteps, target, inputs)
        scores, metrics = scores_from_errors(policy_errors, reference_errors, batch.label)
        metrics["inpo/noise_std"] = noise.std()
        return scores, metrics
