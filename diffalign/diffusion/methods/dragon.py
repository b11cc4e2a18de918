"""DRAGON: Distributional Rewards for Generative Optimization (Bai, Casebeer, Sojoudi, Bryan, arXiv 2504.15217,
TMLR 2025).

An online, on-policy loop around any reward of :mod:`diffalign.rewards`. Per batch of prompts:

1. the current policy generates ``samples_per_prompt`` (K) samples per prompt (the family's DDIM pipeline,
   ``no_grad``), decoded by the family to images or waveforms;
2. a reward scores them, turned to higher-is-better (distances are negated):

   - instance-wise: a reward model or similarity per sample (``clip_score``, ``clap_score``, ``aesthetic``);
   - instance-to-distribution: each sample against an exemplar set (``fad`` with ``reduction: per_sample``);
     exemplars may be of another modality when the encoder is cross-modal (captions as CLAP's reference);
   - distribution-to-distribution: a set-level score of the whole batch of generations (full-set ``fad``,
     ``vendi``), attributed to samples by leave-one-out contribution ``f(S) − f(S \\ {i})``
     (``reduction: leave_one_out``);

   exemplar embeddings (or their Gaussian) are computed once and reused every step (and cached on disk by
   the scorer's ``cache_dir``);
3. within each prompt's K samples, the best ⌊K/2⌋ form the positive set and the worst ⌊K/2⌋ the negative
   set (the middle one is left out for odd K); the i-th best is paired with the i-th worst
   (``pairing: halves``). ``pairing: best_worst`` keeps one pair per prompt, its best vs its worst sample:
   the CLAP-ranked online pairs of TangoFlux's CRPO (Hung et al., arXiv 2412.21037: 5 samples per prompt,
   chosen = highest CLAP score, rejected = lowest), which with ``loss.type: [sigmoid, sft]`` and
   ``loss.weights: [1, 2]`` is also its loss (DPO plus the chosen sample's denoising MSE);
4. the contrast of the two sets is the surrogate of the paper: ``loss.type: [sigmoid]`` is Diffusion-DPO on
   the pairs (shared ε and t per pair, frozen pretrained reference); ``loss.type: [kto]`` treats them as
   unpaired desirable/undesirable sets (Diffusion-KTO, Li et al., arXiv 2404.04465) with the reference point
   z0 = max(0, mean over the batch of (log-ratio)), detached.

The paper has no public code; the per-prompt ranking split, best-with-worst pairing, leave-one-out
attribution and the batch estimate of z0 are our choices where its text (as available to us) is silent.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from diffalign.config import require_at_least_one
from diffalign.diffusion.data import collate_pairs
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    TrainingContext,
    TrainingData,
    register_method,
)
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.methods.online import (
    PromptDataset,
    SampleReward,
    decode_samples,
    derived_seed,
    load_prompts,
    sample_latents,
)
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import PairScores
from diffalign.training.distributed import mean_over_processes

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig

logger = logging.getLogger(__name__)

GENERATION_STREAM = 1  # an item's generations (see online.derived_seed)
PAIR_STREAM = 2  # the diffusion noise of the pairs made from an item

def split_sets(rewards: Tensor, pairing: str = "halves") -> tuple[Tensor, Tensor]:
    """Positive and negative sets from ``rewards [B, K]`` (higher is better), as column indices ``[B, P]``.

    ``halves`` (P = ⌊K/2⌋): row b's best P samples are positives, best first; its worst P negatives, worst
    first, so column i pairs the i-th best with the i-th worst. ``best_worst`` (P = 1): the best against the
    worst. Equal rewards keep their generation order.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"split_sets needs rewards [prompts, samples >= 2], got shape {tuple(rewards.shape)}")
    if pairing not in ("halves", "best_worst"):
        raise ValueError(f"pairing must be 'halves' or 'best_worst', got {pairing!r}")
    count = rewards.shape[1] // 2 if pairing == "halves" else 1
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    # Negatives come from the other end of the same order, so no sample is both positive and negative.
    return order[:, :count], order.flip(1)[:, :count]


@dataclass
class DragonSettings:
    """DRAGON (methods/dragon.py): on-policy generations scored by a reward, contrasted as positive/negative sets."""

    prompts_file: str | None = None  # training prompts, one per line
    prompts: list[str] = field(default_factory=list)
    samples_per_prompt: int = 2  # K generations per prompt, ranked by the reward
    # halves: the best ⌊K/2⌋ are positives and the worst ⌊K/2⌋ negatives, i-th best paired with i-th worst;
    # best_worst: one pair per prompt, its best vs its worst sample (TangoFlux's CRPO pairs, K = 5 there).
    pairing: Literal["halves", "best_worst"] = "halves"
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    generation_batch_size: int = 16
    reward: str = "clip_score"  # a scorer of diffalign.rewards (clip_score, clap_score, fad, vendi, toy_t2i, ...)
    reward_options: dict[str, Any] = field(default_factory=dict)  # the scorer's options (model, reduction, ...)
    # The reward's reference set: a text file (one exemplar per line) or a folder of images or audio files.
    exemplars: str | None = None

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"method.dragon.samples_per_prompt must be >= 2 (a positive and a negative per prompt), "
                f"got {self.samples_per_prompt}"
            )
        require_at_least_one(self, "method.dragon", ("num_inference_steps", "generation_batch_size"))


@register_method("dragon", settings=DragonSettings)
class DistributionalRewardOptimization(PreferenceMethod):
    """Online generations, scored by a (distributional) reward, contrasted as positive vs negative sets."""

    settings: DragonSettings

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: DragonSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.dpo = DiffusionDPO(family, reference)
        keys = ("method.dragon.reward", "method.dragon.reward_options", "method.dragon.exemplars")
        self.reward = SampleReward(settings.reward, settings.reward_options, settings.exemplars, keys)

    def training_data(self, config: DiffusionTrainConfig, accelerator: Any) -> TrainingData:
        prompts = load_prompts(self.settings.prompts_file, self.settings.prompts, key="method.dragon")
        return TrainingData(PromptDataset(prompts), collate_pairs, {"prompts": len(prompts)})

    def make_pairs(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> tuple[LatentPairBatch, dict[str, Tensor]]:
        settings = self.settings
        prompts = list(batch["caption"])
        count = settings.samples_per_prompt
        repeated = [prompt for prompt in prompts for _ in range(count)]
        seeds = [derived_seed(seed, GENERATION_STREAM, k) for seed in context.noise_seeds for k in range(count)]
        latents = sample_latents(
            self.family,
            denoiser,
            repeated,
            seeds,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            batch_size=settings.generation_batch_size,
        )
        rewards = self.reward(decode_samples(self.family, latents, settings.generation_batch_size), repeated)
        rewards = rewards.view(len(prompts), count)
        positive, negative = split_sets(rewards, settings.pairing)

        # Pair p comes from prompt p // half: its i-th best and i-th worst sample, i = p % half.
        half = positive.shape[1]
        rows = torch.arange(len(prompts)).unsqueeze(1) * count
        prompt_embeds = self.family.encode_prompts([prompts[p // half] for p in range(positive.numel())])
        dtype = next(iter(prompt_embeds.values())).dtype
        pairs = LatentPairBatch(
            chosen_latents=latents[(rows + positive).flatten()].to(dtype),
            rejected_latents=latents[(rows + negative).flatten()].to(dtype),
            prompt_embeds=prompt_embeds,
            noise_seeds=[
                derived_seed(context.noise_seeds[p // half], PAIR_STREAM, p % half) for p in range(positive.numel())
            ],
        )
        metrics = {
            "dragon/reward": rewards.mean(),
            "dragon/reward_positive": rewards.gather(1, positive).mean(),
            "dragon/reward_negative": rewards.gather(1, negative).mean(),
        }
        return pairs, metrics

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        scores, metrics = self.dpo.pair_scores(denoiser, batch)
        if scores.has_reference:
            # KTO's reference point: the batch's mean log-ratio, an estimate of KL(π‖π_ref) (≥ 0 in expectation),
            # over every process's pairs so that N processes estimate it like one process with the global batch.
            log_ratios = torch.cat([scores.policy_chosen - scores.ref_chosen, scores.policy_rejected - scores.ref_rejected])
            reference_point = mean_over_processes(log_ratios.float()).clamp(min=0)
            scores = dataclasses.replace(scores, kl_reference_point=reference_point)
            metrics["dragon/kl_reference_point"] = reference_point
        return scores, metrics
