"""SePPO / SSPO: preference optimisation from winning images alone, with past checkpoints as references
(Zhang, Lan et al., "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment", arXiv 2410.05255 v1;
v2: "Bridging SFT and DPO for Diffusion Model Alignment with Self-Sampling Preference Optimization").

Per training step:

1. **Reference model** (v1: reference-model selection; v2: Random Checkpoint Replay). Every
   ``snapshot_every`` steps the policy's trainable weights join a bank of past checkpoints; each step one
   checkpoint is drawn from the bank and serves as the reference ε_ref. With ``selection: uniform`` the bank
   is a reservoir sample of every checkpoint seen, so a bounded bank still gives each past checkpoint the
   same chance; ``latest`` and ``initial`` are the paper's ablations (the newest checkpoint, the pretrained
   model).
2. **Reference sample.** The drawn checkpoint generates x^r for the winner's prompt with a cheap DDIM sampler
   (``num_inference_steps``, classifier-free guidance), under ``no_grad``; x^r replaces the losing image.
   With ``reencode_samples`` (default) x^r is decoded and encoded again (``family.reencode``), so that it
   reaches the loss as a stored loser would: a generated latent lies off the VAE encoder's outputs, and a pair
   of one encoded and one generated latent differs in that as well as in content (measured on the toy
   text-to-image model: docs/experiments.md).
3. **Anchor criterion** (v1: anchor-based adaptive flipper; v2: Self-Sampling Regularisation). The winning
   image x^w is the anchor. If the policy fits it at least as well as the reference checkpoint does,
   ``e_θ^w ≤ e_ref^w`` (e = the per-sample denoising error at the pair's shared ε and t), the policy has
   improved on the reference, so the reference's sample is judged a loser (μ = 1); otherwise the reference
   is the better model and its sample is judged a likely winner: μ = −1 (``likely_winner: pull``, v1's
   flipper) or μ = 0 (``no_push``: the DPO term drops the sample, leaving the SFT-like pull on x^w).
   ``push`` turns the criterion off (μ = 1 always: Diffusion-DPO against the reference's samples), the
   ablation that shows what the criterion adds.
4. **Loss**, the core's ``sigmoid`` with scores ``−½·e`` (μ scales both rejected scores):

       L = −log σ(−½β·[(e_θ^w − e_ref^w) − μ·(e_θ^r − e_ref^r)])

   μ = 1 is Diffusion-DPO with x^r as the loser; μ = −1 pulls the policy towards both images.

The training code of the paper is not public (DwanZhang-AI/SePPO holds evaluation code only), so the
criterion's exact form is our reading of the paper's description: the policy-versus-reference error on the
anchor decides. The bank holds CPU copies of the trainable weights (a few MB for LoRA); for a full
fine-tune, ``bank_dir`` keeps them as safetensors files instead. The bank's contents are saved with every
training checkpoint, so a resumed run draws the same references.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffalign.config import require_at_least_one
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    TrainingContext,
    denoising_error,
    pair_noise,
    register_method,
)
from diffalign.diffusion.methods.dpo import scores_from_errors
from diffalign.diffusion.methods.online import (
    derived_seed,
    sample_latents,
    swapped_weights,
    trainable_weights,
)
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.files import save_tensors_atomically
from diffalign.losses import PairScores

# Random streams of one item (see online.derived_seed), apart from its diffusion noise.
GENERATION_STREAM = 1
REENCODE_STREAM = 4  # the posterior draw of a re-encoded reference sample
# Bank draws, keyed by step or by admission count rather than by item.
SELECTION_STREAM = 2
ADMISSION_STREAM = 3

Admission = Literal["reservoir", "newest", "first"]


class CheckpointBank:
    """At most ``capacity`` past checkpoints (trainable weights), in memory or as files in ``directory``.

    ``admission`` decides what a full bank keeps: ``reservoir`` (a uniform sample of every checkpoint ever
    added: checkpoint n replaces a random entry with probability capacity/(n+1); Vitter's algorithm R),
    ``newest`` (the latest ones) or ``first`` (the earliest ones). Draws come from generators seeded by
    (seed, count) or (seed, step), so a bank restored from :meth:`state_dict` continues exactly.
    """

    def __init__(self, capacity: int, *, admission: Admission = "reservoir", directory: str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a checkpoint bank needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.admission = admission
        self.directory = Path(directory) if directory is not None else None
        self.steps: list[int] = []  # the step of each entry
        self._weights: dict[int, dict[str, Tensor]] = {}  # in memory: step → weights
        self._loaded: tuple[int, dict[str, Tensor]] | None = None  # on disk: the last entry read
        self.offered = 0  # checkpoints ever added, kept or not

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, weights: dict[str, Tensor], seed: int = 0) -> None:
        slot = self._admission_slot(seed)
        self.offered += 1
        if slot is None:
            return
        if slot < len(self.steps):
            self._evict(self.steps[slot])
            self.steps[slot] = step
        else:
            self.steps.append(step)
        if self.directory is None:
            self._weights[step] = weights
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tensors_atomically({name: value.contiguous() for name, value in weights.items()}, self._path(step))

    def _admission_slot(self, seed: int) -> int | None:
        """Where checkpoint number ``offered`` goes: a slot index, or None when the bank does not keep it."""
        if len(self.steps) < self.capacity:
            return len(self.steps)
        if self.admission == "first":
            return None
        if self.admission == "newest":
            return self.steps.index(min(self.steps))
        generator = torch.Generator().manual_seed(derived_seed(seed, ADMISSION_STREAM, self.offered))
        slot = int(torch.randint(self.offered + 1, (), generator=generator))
        return slot if slot < self.capacity else None

    def _evict(self, step: int) -> None:
        self._weights.pop(step, None)
        if self._loaded is not None and self._loaded[0] == step:
            self._loaded = None
        if self.directory is not None:
            self._path(step).unlink(missing_ok=True)

    def _path(self, step: int) -> Path:
        return self.directory / f"step-{step:07d}.safetensors"

    def draw(self, step: int, seed: int = 0) -> int:
        """The step of a uniformly drawn entry; the same for a given (seed, step) on every process."""
        if not self.steps:
            raise RuntimeError("the checkpoint bank is empty; add the initial weights before drawing")
        generator = torch.Generator().manual_seed(derived_seed(seed, SELECTION_STREAM, step))
        return self.steps[int(torch.randint(len(self.steps), (), generator=generator))]

    def weights(self, step: int) -> dict[str, Tensor]:
        if step not in self.steps:
            raise KeyError(f"checkpoint of step {step} is not in the bank (holding steps {sorted(self.steps)})")
        if self.directory is None:
            return self._weights[step]
        if self._loaded is None or self._loaded[0] != step:
            path = self._path(step)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: the bank's checkpoint of step {step} is missing (deleted, or evicted after the "
                    "training checkpoint being resumed was written); resume from the latest checkpoint"
                )
            self._loaded = (step, load_file(path))
        return self._loaded[1]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": list(self.steps), "offered": self.offered}
        if self.directory is None:
            state["weights"] = {step: self._weights[step] for step in self.steps}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = list(state["steps"])
        self.offered = state["offered"]
        self._weights = dict(state.get("weights", {}))
        self._loaded = None


def anchor_weights(
    policy_winner_errors: Tensor,
    reference_winner_errors: Tensor,
    likely_winner: Literal["pull", "no_push", "push"] = "pull",
) -> Tensor:
    """μ per pair from the anchor (the winning image): 1 where ``e_θ^w ≤ e_ref^w`` (the reference sample is
    judged a loser), else −1 (``pull``), 0 (``no_push``) or 1 (``push``: the criterion is off and every
    reference sample is a loser). Inputs ``[B]``, no gradient."""
    winner_weight = {"pull": -1.0, "no_push": 0.0, "push": 1.0}[likely_winner]
    likely_loser = policy_winner_errors.detach() <= reference_winner_errors.detach()
    return torch.where(likely_loser, 1.0, winner_weight).to(policy_winner_errors.dtype)


@dataclass
class SeppoSettings:
    """SePPO/SSPO (methods/seppo.py): winners from the data, losers sampled by a past checkpoint."""

    num_inference_steps: int = 20  # DDIM steps of the reference samples
    guidance_scale: float = 7.5
    generation_batch_size: int = 16
    snapshot_every: int = 50  # the policy joins the checkpoint bank every N optimizer steps (and at step 0)
    bank_size: int = 8  # checkpoints kept (a uniform sample of all past ones)
    # uniform: a random past checkpoint each step (the paper's); latest / initial: its ablations.
    selection: Literal["uniform", "latest", "initial"] = "uniform"
    bank_dir: str | None = None  # None: CPU copies (saved in training checkpoints); a folder: safetensors files
    # When the anchor criterion judges the reference sample a winner: pull towards it (μ = −1) or drop it (μ = 0);
    # push: ignore the criterion (μ = 1: every reference sample is a loser), its ablation.
    likely_winner: Literal["pull", "no_push", "push"] = "pull"
    # Decode each reference sample and encode it again, as the data path encodes a stored loser, so the pair's two
    # members differ in content only, not in where their latents come from (family.reencode).
    reencode_samples: bool = True

    def __post_init__(self) -> None:
        counts = ("num_inference_steps", "generation_batch_size", "snapshot_every", "bank_size")
        require_at_least_one(self, "method.seppo", counts)


@register_method("seppo", settings=SeppoSettings)
class SemiPolicyPreferenceOptimization(PreferenceMethod):
    """Winners from the data, losers sampled by a past checkpoint that is also the reference."""

    settings: SeppoSettings

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: SeppoSettings
    ) -> None:
        # The bank's past checkpoints are the references; the pretrained model is only its first entry.
        super().__init__(family, None, settings)
        admission: Admission = {"uniform": "reservoir", "latest": "newest", "initial": "first"}[
            self.settings.selection
        ]
        self.bank = CheckpointBank(
            self.settings.bank_size if self.settings.selection == "uniform" else 1,
            admission=admission,
            directory=self.settings.bank_dir,
        )
        self.last_snapshot_step: int | None = None
        self.reference_step: int | None = None  # the bank entry serving as reference for the current step

    def update_bank(self, denoiser: nn.Module, step: int, seed: int) -> None:
        """Add the policy as it is at the start of ``step`` when a snapshot is due (once per step)."""
        if step % self.settings.snapshot_every == 0 and step != self.last_snapshot_step:
            self.bank.add(step, trainable_weights(denoiser), seed)
            self.last_snapshot_step = step

    def make_pairs(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> tuple[LatentPairBatch, dict[str, Tensor]]:
        pairs = context.encode(batch)  # the data's winners; their losers are replaced below
        self.update_bank(denoiser, context.step, context.seed)
        self.reference_step = self.bank.draw(context.step, context.seed)
        seeds = [derived_seed(seed, GENERATION_STREAM) for seed in context.noise_seeds]
        with swapped_weights(denoiser, self.bank.weights(self.reference_step)) as reference:
            generated = sample_latents(
                self.family,
                reference,
                list(batch["caption"]),
                seeds,
                num_inference_steps=self.settings.num_inference_steps,
                guidance_scale=self.settings.guidance_scale,
                batch_size=self.settings.generation_batch_size,
            )
        if self.settings.reencode_samples:
            reencode_seeds = [derived_seed(seed, REENCODE_STREAM) for seed in context.noise_seeds]
            generated = self.family.reencode(generated, reencode_seeds)
        pairs = dataclasses.replace(pairs, rejected_latents=generated.to(pairs.chosen_latents.dtype), label=None)
        metrics = {
            "seppo/reference_step": torch.tensor(float(self.reference_step)),
            "seppo/bank_size": torch.tensor(float(len(self.bank))),
        }
        return pairs, metrics

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        if self.reference_step is None:
            raise RuntimeError("SePPO scores pairs made by its make_pairs, which draws the step's reference")
        family = self.family
        latents = batch.both_latents()
        noise, timesteps = pair_noise(family, batch)
        noise, timesteps = torch.cat([noise, noise]), timesteps.repeat(2)
        noisy_latents = family.add_noise(latents, noise, timesteps)
        target = family.target(latents, noise, timesteps)
        inputs = family.denoiser_inputs(batch.both_prompt_embeds(), batch.extras or {})
        # The reference runs first: the policy's forward below must see its own weights in the graph.
        with swapped_weights(denoiser, self.bank.weights(self.reference_step)) as reference:
            reference_errors = denoising_error(family, reference, noisy_latents, timesteps, target, inputs)
        policy_errors = denoising_error(family, denoiser, noisy_latents, timesteps, target, inputs)

        size = batch.size
        mu = anchor_weights(policy_errors[:size], reference_errors[:size], self.settings.likely_winner)
        scores, metrics = scores_from_errors(policy_errors, reference_errors, None)
        scores = dataclasses.replace(
            scores, policy_rejected=mu * scores.policy_rejected, ref_rejected=mu * scores.ref_rejected
        )
        metrics["seppo/likely_loser_fraction"] = (mu > 0).float().mean()
        return scores, metrics

    def extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "last_snapshot_step": self.last_snapshot_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.last_snapshot_step = state["last_snapshot_step"]
