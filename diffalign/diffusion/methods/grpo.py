"""Flow-GRPO: online policy-gradient training of flow-matching models (Liu et al., "Flow-GRPO: Training Flow
Matching Models via Online RL", arXiv 2505.05470; code yifan123/flow_grpo, ``scripts/train_sd3.py``,
``train_sd3_fast.py``, ``config/grpo.py``).

The flow ODE is turned into an SDE with the same marginals (``FlowMatchFamily.sample_trajectory``, families/flow.py):
each stochastic step from σ to σ' is a Gaussian ``N(μθ(x, σ), s²)`` with a per-step log-density averaged over the
latent's elements. Per micro-batch of prompts:

1. the current policy samples G trajectories per prompt (``group_size``) with ``num_inference_steps`` steps, without
   gradients; sample k of a batch item draws its initial and step noise from a generator seeded from the item
   (``online.derived_seed``), so resumed and multi-process runs sample exactly what an uninterrupted run does;
2. the final latents are decoded and scored by one or several weighted scorers of :mod:`diffalign.rewards`;
3. advantages come from the core (``losses.advantages.compute_advantages``) over the global batch (every process's
   rewards): by default Flow-GRPO's ``A_i = clip((r_i − mean_{prompt(i)} r) / (std_batch r + 1e-4), ±5)`` with the
   population std (``advantages: {scale: batch, unbiased_std: false, clip: 5}``; ``scale: group`` is its per-prompt
   std);
4. each trained step j of each trajectory is recomputed under the policy with gradients
   (``transition_log_prob``, the sampler's own code, so the ratio is exactly 1 before any update), and the core's
   clipped objective (``losses.policy_gradient.policy_gradient_loss``, ``loss_type: grpo``) gives

       ρ_{i,j} = exp(log pθ(x_{j+1} | x_j) − log p_old(x_{j+1} | x_j)),
       L = mean_{i,j} max(−A_i·ρ_{i,j}, −A_i·clip(ρ_{i,j}, 1 − ε, 1 + ε))  +  β·mean_{i,j} KL_{i,j}

   with ε = ``policy_gradient.epsilon_low`` (Flow-GRPO's ``clip_range``, 1e-4: the averaged log-densities move
   little). Each micro-batch's trajectories are trained once, right after they are sampled, so ρ is 1 and the
   gradient is ``−mean A·∇log pθ``; the clip bounds only reused rollouts, such as Flow-GRPO's later sample
   batches of an epoch, which are an update old when trained (not done here). The KL to the reference (the base
   model; LoRA: its adapters off) is computed outside ``no_grad``, in ``kl_space: mean``: Flow-GRPO's
   ``mean_elems(μθ − μref)²/(2σ_t²)``, σ_t = a·√(σ/(1 − σ)) (the Gaussian KL times |Δσ|), or ``velocity``:
   ``mean_elems(vθ − vref)²`` (Flow-Factory's ``v-based``).

Which steps are trained (``trained_steps``):

- ``fraction`` (Flow-GRPO): every step is stochastic; the first ``int(S·timestep_fraction)`` are trained (0.99 of
  10 steps trains 0..8, never the last);
- ``window`` (Flow-GRPO-Fast, MixGRPO): the ODE everywhere except ``window_size`` consecutive stochastic steps, the
  only ones trained, placed inside ``window_range`` [low, high) (default [0, S/2)): at its start (``fixed``),
  uniformly at random per optimizer step (``random``, Flow-GRPO-Fast; seeded from the run's seed and the step),
  or moving one step later every ``window_shift_every`` optimizer steps and wrapping round (``progressive``,
  MixGRPO's sliding window).

Classifier-free guidance follows the rollouts: with ``guidance_scale > 1`` on a family with an unconditional input
(SD3) both the rollouts and the recomputed steps use ``v_u + w·(v_c − v_u)`` on [empty; prompt] (Flow-GRPO's
``train.cfg: true``, gradients through both branches); ``guidance_scale: 1`` is CFG-free training (its ``*_nocfg``
recipes: RL distils the guidance). Training the conditional velocity of guided rollouts would make the ratio
differ from 1 before any update, so the two are not set apart. FLUX.1-dev takes the scale as its guidance
embedding in both. Evaluation samples the ODE with ``eval.num_inference_steps`` (usually more than the rollouts').

Memory: training recomputes the trajectories in their rollout chunks and backpropagates the loss a part at a time
(``FlowGRPO.policy_loss``; the parts sum to the batch's loss): with token-level ratios one chunk at one trained step,
as Flow-GRPO does, so a backward holds the graphs of ``generation_batch_size`` denoiser calls (twice that many
samples with CFG), whatever G·batch_size and the number of trained steps; with GSPO's or RLOO's sequence ratio one
chunk at all its trained steps. Lower ``generation_batch_size`` for large models. Under DeepSpeed, whose engine
steps inside backward, the parts are summed into one backward (all of the micro-batch's graphs at once).

Online DPO for flow models is DRAGON's ``pairing: best_worst`` (methods/dragon.py): each group's best vs worst
sample as a pair for any pair loss (``configs/toy_flow_online_dpo.yaml``). A DDPO-style variant for the DDPM
families would need a DDIM sampler with per-step log-probs, which those families do not have: ``grpo`` requires
``flow_matching``. Not reproduced from Flow-GRPO: dropping samples whose advantage is zero, several inner epochs
per rollout batch, CPS sampling and an EMA of the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from diffalign.config import require_at_least_one
from diffalign.diffusion.data import collate_pairs
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.families.flow import FlowMatchFamily, Trajectory, Transition
from diffalign.diffusion.methods.base import DiffusionMethod, TrainingContext, TrainingData, register_method
from diffalign.diffusion.methods.online import (
    PromptDataset,
    SampleReward,
    decode_samples,
    derived_seed,
    load_prompts,
)
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import LossConfig
from diffalign.losses.advantages import AdvantageConfig, compute_advantages
from diffalign.losses.policy_gradient import (
    PolicyGradientConfig,
    element_weight,
    policy_gradient_loss,
    sums_over_elements,
)
from diffalign.training import StepOutput
from diffalign.training.distributed import global_rows

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig

GENERATION_STREAM = 1  # an item's trajectories (see online.derived_seed)
WINDOW_STREAM = 2  # the random window's placement, from the run's seed and the optimizer step
INITIAL_NOISE_STREAM = 3  # the initial noise a group shares (same_initial_noise)


@dataclass
class RewardTerm:
    """One reward of ``method.grpo.rewards``: a scorer of diffalign.rewards, its weight in the sum, its options and
    exemplar set (a text file or a folder of images or audio)."""

    name: str = "clip_score"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    exemplars: str | None = None


@dataclass
class FlowGRPOPolicyGradient(PolicyGradientConfig):
    """The core's policy-gradient settings with Flow-GRPO's defaults: the mean over samples and trained steps of
    the clipped objective, ε = 1e-4 (``train.clip_range``)."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "rloo"] = "grpo"
    epsilon_low: float = 1e-4


@dataclass
class FlowGRPOAdvantages(AdvantageConfig):
    """The core's advantage settings with Flow-GRPO's defaults: the prompt's mean reward as the baseline, the
    batch's population std as the scale (``global_std``), clamped to ±5 (``adv_clip_max``)."""

    scale: Literal["group", "batch", "none"] = "batch"
    unbiased_std: bool = False
    clip: float | None = 5.0


@dataclass
class GRPOSettings:
    """Flow-GRPO (methods/grpo.py): G SDE trajectories per prompt, group-relative advantages, clipped ratios."""

    prompts_file: str | None = None  # training prompts, one per line
    prompts: list[str] = field(default_factory=list)
    group_size: int = 8  # G trajectories per prompt
    num_inference_steps: int = 10  # S steps per rollout
    guidance_scale: float = 4.5  # rollouts and recomputed steps alike (see the module docstring)
    noise_level: float = 0.7  # a in σ_t = a·√(σ/(1 − σ))
    # The G trajectories of a prompt start from one noise (Flow-GRPO's same_latent, DanceGRPO's init_same_noise),
    # so they differ only where they are stochastic: with a window, only inside it.
    same_initial_noise: bool = False
    generation_batch_size: int = (
        16  # trajectories per denoiser call; training recomputes them in the same chunks
    )
    trained_steps: Literal["fraction", "window"] = "fraction"
    timestep_fraction: float = 0.99  # fraction: the first int(S·fraction) steps are trained
    window_size: int = 2  # window: stochastic and trained steps
    window_placement: Literal["fixed", "random", "progressive"] = "random"
    window_range: list[int] | None = None  # [low, high): the steps the window may cover; null: [0, S // 2]
    window_shift_every: int = 25  # progressive: optimizer steps before the window moves one step later
    policy_gradient: FlowGRPOPolicyGradient = field(default_factory=FlowGRPOPolicyGradient)
    kl_beta: float = 0.0  # β of the KL to the reference (0: no reference forward)
    kl_space: Literal["mean", "velocity"] = "mean"
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    advantages: FlowGRPOAdvantages = field(default_factory=FlowGRPOAdvantages)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"method.grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        counts = ("num_inference_steps", "generation_batch_size", "window_size", "window_shift_every")
        require_at_least_one(self, "method.grpo", counts)
        if not self.noise_level > 0:
            raise ValueError(
                f"method.grpo.noise_level must be > 0 (0 is the ODE, which has no log-prob), got {self.noise_level}"
            )
        if int(self.num_inference_steps * self.timestep_fraction) < 1 or self.timestep_fraction > 1:
            raise ValueError(
                f"method.grpo.timestep_fraction={self.timestep_fraction} trains int({self.num_inference_steps} × "
                f"{self.timestep_fraction}) steps; give a fraction in (0, 1] that trains at least one"
            )
        if self.trained_steps == "window":
            low, high = self.window_bounds()
            if not 0 <= low < high <= self.num_inference_steps or high - low < self.window_size:
                raise ValueError(
                    f"method.grpo.window_range [{low}, {high}) must lie within the {self.num_inference_steps} steps "
                    f"and hold window_size={self.window_size} steps"
                )
        if self.kl_beta < 0:
            raise ValueError(f"method.grpo.kl_beta must be >= 0, got {self.kl_beta}")
        if self.policy_gradient.beta != 0:
            raise ValueError(
                "method.grpo.policy_gradient.beta (the k3 KL of token log-probs) is not used here; set "
                "method.grpo.kl_beta, Flow-GRPO's KL of the step means"
            )
        if not self.rewards:
            raise ValueError("method.grpo.rewards is empty; give at least one, e.g. [{name: clip_score}]")
        if self.advantages.reward_weights is not None:
            raise ValueError(
                "method.grpo.advantages.reward_weights: give each reward its weight in method.grpo.rewards[i].weight"
            )

    def window_bounds(self) -> tuple[int, int]:
        if self.window_range is None:
            return 0, max(self.num_inference_steps // 2, self.window_size)
        if len(self.window_range) != 2:
            raise ValueError(f"method.grpo.window_range must be [low, high], got {self.window_range}")
        return self.window_range[0], self.window_range[1]


def step_plan(settings: GRPOSettings, step: int, seed: int) -> tuple[Tensor, Tensor]:
    """Which of the S steps are stochastic and which are trained at optimizer step ``step`` (``[S]`` bool each)."""
    count = settings.num_inference_steps
    steps = torch.arange(count)
    if settings.trained_steps == "fraction":
        return torch.ones(count, dtype=torch.bool), steps < int(count * settings.timestep_fraction)
    low, high = settings.window_bounds()
    starts = high - settings.window_size - low + 1  # the window's possible first steps: low .. high − size
    if settings.window_placement == "fixed":
        start = low
    elif settings.window_placement == "progressive":
        start = low + (step // settings.window_shift_every) % starts
    else:
        generator = torch.Generator().manual_seed(derived_seed(seed, WINDOW_STREAM, step))
        start = low + int(torch.randint(starts, (1,), generator=generator))
    window = (steps >= start) & (steps < start + settings.window_size)
    return window, window


def mean_space_kl(policy: Transition, reference: Transition, delta: Tensor) -> Tensor:
    """Flow-GRPO's KL of an SDE step ``[B]``: ``mean_elems(μθ − μref)² / (2σ_t²)``, with σ_t² = s²/|Δσ| (the exact
    Gaussian KL ``‖μθ − μref‖²/(2s²)`` per element, times |Δσ|; ``train_sd3.py``, flow_grpo#78)."""
    squared = (policy.mean - reference.mean).pow(2).mean(dim=tuple(range(1, policy.mean.ndim)))
    std_t_squared = policy.std.flatten(1)[:, 0].pow(2) / delta.abs()
    return squared / (2 * std_t_squared)


def velocity_space_kl(policy: Transition, reference: Transition) -> Tensor:
    """Flow-Factory's ``v-based`` KL of an SDE step ``[B]``: ``mean_elems(vθ − vref)²``."""
    return (policy.velocity - reference.velocity).pow(2).mean(dim=tuple(range(1, policy.velocity.ndim)))


@dataclass
class Rollout:
    """A chunk of trajectories sampled by one chain of denoiser calls, and their prompts."""

    prompts: list[str]
    trajectory: Trajectory


@register_method("grpo", settings=GRPOSettings)
class FlowGRPO(DiffusionMethod):
    """Group-relative policy optimisation on SDE trajectories of a flow-matching model."""

    requires = frozenset({"flow_matching"})
    settings: GRPOSettings
    family: FlowMatchFamily

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: GRPOSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.rewards = [
            SampleReward(
                term.name,
                term.options,
                term.exemplars,
                tuple(f"method.grpo.rewards[{i}].{key}" for key in ("name", "options", "exemplars")),
            )
            for i, term in enumerate(settings.rewards)
        ]
        self.advantage_config = dataclasses.replace(
            settings.advantages, reward_weights=[term.weight for term in settings.rewards]
        )

    @classmethod
    def check_config(cls, config: DiffusionTrainConfig) -> None:
        if config.loss != LossConfig():
            raise ValueError(
                "method.name: grpo takes its loss from method.grpo.policy_gradient (and method.grpo.kl_beta); "
                "remove the loss: section"
            )
        if config.model.trainable == "lora" and config.model.lora.dropout != 0:
            raise ValueError(
                f"model.lora.dropout={config.model.lora.dropout}: GRPO recomputes each sampled step under the "
                "policy, and dropout would make the ratio differ from 1 before any update; set it to 0"
            )

    @classmethod
    def requirements(cls, config: DiffusionTrainConfig) -> frozenset[str]:
        guided = config.method.grpo.guidance_scale > 1
        return (cls.requires | {"stepwise_guidance"}) if guided else cls.requires

    @classmethod
    def uses_reference(cls, config: DiffusionTrainConfig) -> bool:
        return config.method.grpo.kl_beta > 0

    def training_data(self, config: DiffusionTrainConfig, accelerator: Any) -> TrainingData:
        prompts = load_prompts(self.settings.prompts_file, self.settings.prompts, key="method.grpo")
        return TrainingData(PromptDataset(prompts), collate_pairs, {"prompts": len(prompts)})

    # --- the loss -----------------------------------------------------------------------------------------------
    def training_loss(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> StepOutput:
        settings = self.settings
        group = settings.group_size
        prompts = [prompt for prompt in batch["caption"] for _ in range(group)]
        seeds = [
            derived_seed(seed, GENERATION_STREAM, k) for seed in context.noise_seeds for k in range(group)
        ]
        sde_steps, trained = step_plan(settings, context.step, context.seed)
        initial = (
            self.shared_initial_noise(denoiser, context.noise_seeds) if settings.same_initial_noise else None
        )
        rollouts = self.rollout(denoiser, prompts, seeds, sde_steps, initial)
        samples = torch.cat([rollout.trajectory.samples for rollout in rollouts])
        rewards = self.score(samples, prompts)
        advantages = self.group_advantages(rewards.to(samples.device))

        loss, new_logps, old_logps, kl = self.policy_loss(
            denoiser, rollouts, advantages, trained.nonzero().flatten().tolist(), context.backward
        )
        # The clip fractions and ratio statistics of the whole batch, from its detached log-probs.
        batch_metrics = policy_gradient_loss(
            new_logps, old_logps, advantages, torch.ones_like(new_logps), settings.policy_gradient
        ).metrics
        log_ratio = new_logps - old_logps
        total = rewards @ torch.tensor(self.advantage_config.reward_weights)
        metrics = {
            **batch_metrics,
            "ratio/std": torch.exp(log_ratio).std(unbiased=False),
            "approx_kl": 0.5 * log_ratio.pow(2).mean(),  # Flow-GRPO's logged estimate
            "reward/mean": total.mean(),
            "reward/std": total.std(unbiased=False),
            "advantage/abs_mean": advantages.abs().mean().detach(),
        }
        if len(settings.rewards) > 1:
            metrics.update(
                {f"reward/{term.name}": rewards[:, i].mean() for i, term in enumerate(settings.rewards)}
            )
        if kl is not None:
            metrics["kl_to_reference"] = kl.mean()
        return StepOutput(
            loss=loss,
            metrics=metrics,
            counts={"samples": len(prompts)},
            backpropagated=context.backward is not None,
        )

    def policy_loss(
        self,
        denoiser: nn.Module,
        rollouts: list[Rollout],
        advantages: Tensor,
        steps: list[int],
        backward: Callable[[Tensor], None] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The loss of every trajectory, recomputed a part at a time, and the detached per-step log-probs (policy,
        sampling) and KL ``[N, len(steps)]`` of all of them.

        Every trained step of every trajectory counts alike (an all-ones mask), so the loss is a sum over parts:
        with token-level ratios a part is one rollout chunk at one trained step, weighted by
        :func:`element_weight`, as Flow-GRPO backpropagates; GSPO's and RLOO's sequence ratio couples a
        trajectory's steps, so there a part is one chunk at all of them, weighted by its share of the trajectories.
        With ``backward`` each part is backpropagated at once and the returned loss is detached: a backward holds
        the graphs of one part's denoiser calls, not of the micro-batch's.
        """
        size = len(advantages)
        by_step = sums_over_elements(self.settings.policy_gradient)
        loss, new, old, kl, start = advantages.new_zeros(()), [], [], [], 0
        for rollout in rollouts:
            rows = slice(start, start + len(rollout.prompts))
            start = rows.stop
            conditioning = self.family.sampling_inputs(rollout.prompts, self.settings.guidance_scale)
            chunk_new, chunk_old, chunk_kl = [], [], []
            for part_steps in ([step] for step in steps) if by_step else [steps]:
                part_new, part_old, part_kl = self.recompute(denoiser, rollout, part_steps, conditioning)
                part = self.part_loss(part_new, part_old, part_kl, advantages[rows], (size, len(steps)))
                if backward is not None:
                    backward(part)
                    part = part.detach()
                loss = loss + part
                chunk_new.append(part_new.detach())
                chunk_old.append(part_old)
                if part_kl is not None:
                    chunk_kl.append(part_kl.detach())
            new.append(torch.cat(chunk_new, dim=1))
            old.append(torch.cat(chunk_old, dim=1))
            if chunk_kl:
                kl.append(torch.cat(chunk_kl, dim=1))
        return loss, torch.cat(new), torch.cat(old), torch.cat(kl) if kl else None

    def part_loss(
        self,
        new_logps: Tensor,
        old_logps: Tensor,
        kl: Tensor | None,
        advantages: Tensor,
        batch_shape: tuple[int, int],
    ) -> Tensor:
        """One part's term of the loss of the whole batch of ``batch_shape`` (trajectories, trained steps)."""
        config = self.settings.policy_gradient
        trajectories, steps = batch_shape
        output = policy_gradient_loss(new_logps, old_logps, advantages, torch.ones_like(new_logps), config)
        if sums_over_elements(config):
            part = output.per_element.sum() * element_weight(config, trajectories, steps)
        else:
            part = output.loss * (len(new_logps) / trajectories)
        if kl is not None:
            part = part + self.settings.kl_beta * kl.sum() / (trajectories * steps)
        return part

    def shared_initial_noise(self, denoiser: nn.Module, item_seeds: list[int]) -> Tensor:
        """One initial noise per batch item, repeated for its G trajectories: ``[N, ...]``."""
        parameter = next(extract_model_from_parallel(denoiser).parameters())
        noise = [
            torch.randn(
                self.family.latent_shape(),
                generator=torch.Generator(parameter.device).manual_seed(
                    derived_seed(seed, INITIAL_NOISE_STREAM)
                ),
                device=parameter.device,
                dtype=parameter.dtype,
            )
            for seed in item_seeds
        ]
        return torch.stack(noise).repeat_interleave(self.settings.group_size, dim=0)

    @torch.no_grad()
    def rollout(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        seeds: list[int],
        sde_steps: Tensor,
        initial_latents: Tensor | None = None,
    ) -> list[Rollout]:
        """Trajectories in chunks of ``generation_batch_size``; trajectory i draws its noise from ``seeds[i]``
        (only its step noise when ``initial_latents`` are given)."""
        settings = self.settings
        model = extract_model_from_parallel(denoiser)
        device = next(model.parameters()).device
        rollouts = []
        for start in range(0, len(prompts), settings.generation_batch_size):
            chunk = prompts[start : start + settings.generation_batch_size]
            generators = [
                torch.Generator(device).manual_seed(seed) for seed in seeds[start : start + len(chunk)]
            ]
            trajectory = self.family.sample_trajectory(
                model,
                chunk,
                generators,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                noise_level=settings.noise_level,
                sde_steps=sde_steps,
                initial_latents=None
                if initial_latents is None
                else initial_latents[start : start + len(chunk)],
            )
            rollouts.append(Rollout(chunk, trajectory))
        return rollouts

    def score(self, samples: Tensor, prompts: list[str]) -> Tensor:
        """Rewards ``[N, K]`` of the decoded samples, one column per reward (fp32, CPU)."""
        decoded = decode_samples(self.family, samples, self.settings.generation_batch_size)
        return torch.stack([reward(decoded, prompts) for reward in self.rewards], dim=1)

    def group_advantages(self, rewards: Tensor) -> Tensor:
        """This process's advantages ``[N]``, with the statistics of every process's rewards (the global batch)."""
        every_process, own_rows = global_rows(rewards)
        return compute_advantages(every_process, self.settings.group_size, self.advantage_config)[own_rows]

    def recompute(
        self, denoiser: nn.Module, rollout: Rollout, steps: list[int], conditioning: tuple[dict[str, Any], bool]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per step of ``steps`` of one rollout chunk: the policy's log-probs (with gradients), the sampling ones
        and the KL to the reference (None without ``kl_beta``), each ``[chunk, len(steps)]``. ``conditioning``:
        the family's ``sampling_inputs`` for the chunk's prompts."""
        settings, family = self.settings, self.family
        trajectory = rollout.trajectory
        sigmas, size = trajectory.sigmas, len(rollout.prompts)
        inputs, guided = conditioning
        new, kl = [], []
        for step in steps:
            arguments = (
                trajectory.latents[:, step],
                trajectory.latents[:, step + 1],
                sigmas[step].expand(size),
                sigmas[step + 1].expand(size),
                sigmas[1].expand(1),
                inputs,
                guided,
                settings.guidance_scale,
                settings.noise_level,
            )
            transition = family.transition_log_prob(denoiser, *arguments)
            new.append(transition.log_prob)
            if settings.kl_beta > 0:
                kl.append(self.reference_kl(transition, arguments, sigmas[step + 1] - sigmas[step]))
        old = trajectory.log_probs[:, steps]
        return torch.stack(new, dim=1), old, torch.stack(kl, dim=1) if kl else None

    def reference_kl(self, transition: Transition, arguments: tuple, delta: Tensor) -> Tensor:
        """The KL ``[B]`` of the policy's step to the reference's: the reference runs without gradients, the KL
        outside ``no_grad`` so that its gradient reaches the policy."""
        if self.reference is None:
            raise ValueError(
                "method.grpo.kl_beta > 0 needs the reference model, which this run did not build"
            )
        with self.reference.use(transition.mean.device) as reference:
            reference_transition = self.family.transition_log_prob(reference, *arguments)
        if self.settings.kl_space == "velocity":
            return velocity_space_kl(transition, reference_transition)
        return mean_space_kl(transition, reference_transition, delta)
