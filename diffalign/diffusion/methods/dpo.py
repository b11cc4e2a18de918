"""Diffusion-DPO (Wallace et al., 2023, arXiv 2311.12908): preference loss on the denoising error.

Both members of a pair are noised with the same ε at the same t, the policy runs once on the concatenated
batch, and the per-sample error ``L = mean_{C,H,W} (prediction − target)²`` becomes the core's score
``−½·L``. With ``loss.type: sigmoid`` and ``loss.beta: 5000`` the loss is the official

    −log σ(−½·β·((L_θ^w − L_ref^w) − (L_θ^l − L_ref^l)))

(SalesforceAIResearch/DiffusionDPO, train.py). The diffusers research example writes the same loss as
``−log σ(β'·(ref_diff − model_diff))`` with β'=2500: its β' is our β/2.

The same code is flow-matching DPO on the rectified-flow families (SD3, FLUX.1, FLUX.2, Qwen-Image, SANA,
ACE-Step): there the family noises ``x_σ = (1 − σ)·x0 + σ·ε`` and the target is the velocity ``v = ε − x0``, so
``L = mean (v̂ − v)²`` and the loss is that of flow-model DPO as the flow-RL peers train it (flow_grpo
``train_sd3_dpo.py``, Flow-Factory's DPO trainer: shared ε and σ per pair, per-sample means, the same ½β). Since
``ε̂ − ε = (1 − σ)(v̂ − v)``, velocity-space DPO with β equals ε-space DPO with ``β_ε(σ) = β/(1 − σ)²``: the two
agree near clean data and the velocity form weighs high-noise errors more, so β does not transfer between the two
(peers use β ≈ 100–2000 on SD3.5/FLUX LoRA where SD1.5 uses 5000).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    denoising_error,
    pair_noise,
    register_method,
)
from diffalign.losses import PairScores


class NoisedPairs(NamedTuple):
    """What a denoising error needs, in :func:`denoising_error`'s argument order."""

    noisy_latents: Tensor
    timesteps: Tensor
    target: Tensor
    inputs: dict[str, Any]


def scores_from_errors(
    policy_errors: Tensor, reference_errors: Tensor | None, label: Tensor | None
) -> tuple[PairScores, dict[str, Tensor]]:
    """Per-sample errors of ``[chosen; rejected]`` → the core's scores ``−½·error`` and MSE diagnostics."""
    batch_size = policy_errors.shape[0] // 2
    policy_chosen, policy_rejected = policy_errors[:batch_size], policy_errors[batch_size:]
    metrics = {"mse/policy_chosen": policy_chosen.detach().mean(), "mse/policy_rejected": policy_rejected.detach().mean()}
    ref_chosen = ref_rejected = None
    if reference_errors is not None:
        ref_chosen, ref_rejected = reference_errors[:batch_size], reference_errors[batch_size:]
        metrics["mse/ref_chosen"] = ref_chosen.mean()
        metrics["mse/ref_rejected"] = ref_rejected.mean()
        ref_chosen, ref_rejected = -0.5 * ref_chosen, -0.5 * ref_rejected
    scores = PairScores(
        policy_chosen=-0.5 * policy_chosen,
        policy_rejected=-0.5 * policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        label=label,
    )
    return scores, metrics


@register_method("dpo")
class DiffusionDPO(PreferenceMethod):
    """Denoising errors on freshly noised latents: shared ε and t per pair, one policy forward for both."""

    supports_reference_cache = True

    def noised(self, batch: LatentPairBatch) -> NoisedPairs:
        """The denoiser's inputs and targets for ``[chosen; rejected]``: one ε and t per pair, shared by both."""
        family = self.family
        latents = batch.both_latents()
        noise, timesteps = pair_noise(family, batch)
        noise, timesteps = torch.cat([noise, noise]), timesteps.repeat(2)
        return NoisedPairs(
            noisy_latents=family.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            target=family.target(latents, noise, timesteps),
            inputs=family.denoiser_inputs(batch.both_prompt_embeds(), batch.extras or {}),
        )

    def reference_errors(self, batch: LatentPairBatch, noised: NoisedPairs | None = None) -> Tensor:
        """The reference's per-sample errors of ``[chosen; rejected]`` (no gradient): what the reference cache stores."""
        if self.reference is None:
            raise ValueError("this DiffusionDPO has no reference (the loss is reference-free)")
        noised = noised if noised is not None else self.noised(batch)
        with self.reference.use(noised.noisy_latents.device) as reference:
            return denoising_error(self.family, reference, *noised)

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        """Scores of a batch. ``reference_errors`` (``[2B]``, from the reference cache) replaces the reference's
        forward; they must have been computed for this batch's noise and timesteps (its ``noise_seeds``)."""
        noised = self.noised(batch)
        policy_errors = denoising_error(self.family, denoiser, *noised)
        if reference_errors is None and self.reference is not None:
            reference_errors = self.reference_errors(batch, noised)
        return scores_from_errors(policy_errors, reference_errors, batch.label)
