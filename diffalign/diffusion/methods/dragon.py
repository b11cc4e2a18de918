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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import soundfile
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

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
from diffalign.diffusion.methods.online import decode_samples, derived_seed, sample_latents
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.eval.prompts import read_prompts
from diffalign.losses import PairScores
from diffalign.rewards import Audio, Samples, build_scorer
from diffalign.training.distributed import mean_over_processes

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig

logger = logging.getLogger(__name__)

GENERATION_STREAM = 1  # an item's generations (see online.derived_seed)
PAIR_STREAM = 2  # the diffusion noise of the pairs made from an item

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


def load_prompts(path: str | None, prompts: Sequence[str]) -> list[str]:
    """``prompts`` plus those of the prompt file ``path`` (one per line in a .txt; see eval/prompts.py)."""
    loaded = list(prompts)
    if path is not None:
        loaded += read_prompts(Path(path), key="method.dragon.prompts_file")
    if not loaded:
        raise ValueError(
            "method.dragon has no prompts; set method.dragon.prompts_file (one prompt per line) or method.dragon.prompts"
        )
    return loaded


def load_exemplars(path: str) -> list[str] | list[Image.Image] | Audio:
    """An exemplar set: a text file (one exemplar text per line, e.g. captions for a CLAP reward), or a folder of
    images, or of audio files (mixed to mono, cut to the shortest; all at one sample rate)."""
    location = Path(path)
    if location.is_file():
        texts = [line.strip() for line in location.read_text().splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"method.dragon.exemplars: {location} has no non-empty line")
        return texts
    if not location.is_dir():
        raise FileNotFoundError(
            f"method.dragon.exemplars: {location} does not exist; give a text file or a folder of images or audio"
        )
    files = sorted(path for path in location.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES | AUDIO_SUFFIXES)
    kinds = {path.suffix.lower() in IMAGE_SUFFIXES for path in files}
    if not files or len(kinds) > 1:
        raise ValueError(
            f"method.dragon.exemplars: {location} must hold images ({sorted(IMAGE_SUFFIXES)}) or audio files "
            f"({sorted(AUDIO_SUFFIXES)}), not {'both' if files else 'neither'}"
        )
    if kinds == {True}:
        return [Image.open(path).convert("RGB") for path in files]
    waveforms, rates = [], set()
    for file in files:
        try:
            data, rate = soundfile.read(file, dtype="float32", always_2d=True)
        except RuntimeError as error:
            raise ValueError(f"method.dragon.exemplars: cannot read {file} ({error})") from None
        waveforms.append(torch.from_numpy(data.mean(axis=1)))
        rates.add(rate)
    if len(rates) > 1:
        raise ValueError(f"method.dragon.exemplars: {location} mixes sample rates {sorted(rates)}; resample to one")
    length = min(len(waveform) for waveform in waveforms)
    return Audio(torch.stack([waveform[:length] for waveform in waveforms]), rates.pop())


class PromptDataset(Dataset):
    """Training prompts: items ``{"caption", "index"}``."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption": self.prompts[index], "index": index}


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
        for name in ("num_inference_steps", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.dragon.{name} must be >= 1, got {getattr(self, name)}")


@register_method("dragon", settings=DragonSettings)
class DistributionalRewardOptimization(PreferenceMethod):
    """Online generations, scored by a (distributional) reward, contrasted as positive vs negative sets."""

    settings: DragonSettings

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: DragonSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.dpo = DiffusionDPO(family, reference)
        self.scorer = build_scorer(self.settings.reward, **self.settings.reward_options).eval()
        if self.scorer.set_level:
            raise ValueError(
                f"method.dragon.reward: {self.settings.reward!r} returns one score per set; DRAGON needs a "
                "signal per sample: set method.dragon.reward_options.reduction to leave_one_out (or per_sample)"
            )
        self.exemplars = None
        if self.settings.exemplars is not None:
            # Embedded (or summarised as a Gaussian) once: the set does not change during training.
            self.exemplars = self.scorer.prepare_reference(load_exemplars(self.settings.exemplars))

    def training_data(self, config: DiffusionTrainConfig, accelerator: Any) -> TrainingData:
        prompts = load_prompts(self.settings.prompts_file, self.settings.prompts)
        return TrainingData(PromptDataset(prompts), collate_pairs, {"prompts": len(prompts)})

    @torch.no_grad()
    def rewards(self, samples: Samples, prompts: list[str]) -> Tensor:
        """Per-sample rewards ``[N]``, higher is better, in fp32 on the CPU."""
        extra = {} if self.exemplars is None else {"reference": self.exemplars}
        scores = self.scorer(samples, prompts, **extra).float().cpu()
        return scores if self.scorer.higher_is_better else -scores

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
        rewards = self.rewards(decode_samples(self.family, latents, settings.generation_batch_size), repeated)
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
