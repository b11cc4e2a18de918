"""Flow-GRPO (method ``grpo``) on the tiny SD3 and FLUX pipelines: the on-policy ratio in real training steps, the
loss against Flow-GRPO's objective written out here on a hand-built trajectory, its advantages, the trained-step
window, an exact resume after a crash, two processes equal to one, and the config's refusals."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import diffusion_settings, merged, method_settings, torchrun
from safetensors.torch import load_file
from test_flow_families import (
    DATA,
    FLOW_MODEL,
    PROMPTS,
    RESOLUTION,
    TEXT_LENGTH,
    options,
    random_lora,
    velocity_by_hand,
)
from tiny_pipelines import (
    build_tiny_flux,
    build_tiny_flux2_klein,
    build_tiny_qwen_image,
    build_tiny_sana,
    build_tiny_sd,
    build_tiny_sd3,
)

from diffalign.config import ConfigError, from_dict
from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.families.flow import Trajectory
from diffalign.diffusion.methods import TrainingContext
from diffalign.diffusion.methods.grpo import FlowGRPO, GRPOSettings, Rollout, step_plan
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import train
from diffalign.losses import policy_gradient_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
TRAINING_PROMPTS = ["a red circle", "a blue square", "a small green circle"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo-models")
    return {
        "sd3": build_tiny_sd3(root / "sd3"),
        "flux": build_tiny_flux(root / "flux"),
        "flux2": build_tiny_flux2_klein(root / "flux2"),
        "qwen_image": build_tiny_qwen_image(root / "qwen-image"),
        "sana": build_tiny_sana(root / "sana"),
    }


def grpo_settings(**settings) -> GRPOSettings:
    defaults = {
        "prompts": TRAINING_PROMPTS,
        "group_size": 3,
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
        "generation_batch_size": 3,
        "rewards": [{"name": "test_mean_red"}],
    }
    return method_settings("grpo", **{**defaults, **settings})


def raw_config(model_dir: Path, output: Path, grpo: dict | None = None, model: dict | None = None, **run) -> dict:
    settings = dataclasses.asdict(grpo_settings(**(grpo or {})))
    raw = diffusion_settings(
        model_dir, None, output, steps=2, model=model or FLOW_MODEL, method={"name": "grpo", "grpo": settings},
        # eps far above every |gradient| and no weight decay make AdamW plain SGD (lr/eps = 3): Adam's 1/√v would
        # blow the all-reduce's fp32 rounding up into lr-sized steps.
        optim={"lr": 3e3, "eps": 1e3, "weight_decay": 0.0}, run=run,
    )
    del raw["loss"]  # GRPO's loss is its policy gradient, set in method.grpo
    return {"kind": "diffusion", **raw}


def config_for(
    model_dir: Path, output: Path, grpo: dict | None = None, model: dict | None = None, **run
) -> DiffusionTrainConfig:
    return from_dict(DiffusionTrainConfig, raw_config(model_dir, output, grpo, model, **run))


def logged(output: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records if "loss" in record}


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((output / "checkpoints").iterdir())[-1] / "trainable.safetensors")


# --- real training steps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "grpo"),
    [
        ("sd3", {"kl_beta": 0.5}),  # guided rollouts, every step stochastic, all but the last trained
        ("flux", {"kl_beta": 0.5, "kl_space": "velocity", "trained_steps": "window", "window_size": 2}),
        ("qwen_image", {"kl_beta": 0.5}),  # guided with the pipeline's norm rescaling
        ("sana", {"kl_beta": 0.5}),  # guided against the empty prompt without the instruction
        ("flux2", {"kl_beta": 0.5}),  # 2×2-patchified, batch-normalised latents
    ],
)
def test_a_lora_step_per_family_is_on_policy_and_trains(model_dirs, tmp_path, name, grpo):
    """With no update between sampling and training the recomputed log-probs equal the sampling ones: the logged
    ratio is 1 to 1e-5 in fp32, nothing is clipped; the update moves the LoRA weights and the KL off zero."""
    sizes = {"max_text_length": TEXT_LENGTH[name], "sample_resolution": RESOLUTION[name]}
    model = merged(FLOW_MODEL, sizes) if name in ("qwen_image", "sana", "flux2") else None
    raw = raw_config(model_dirs[name], tmp_path, grpo, model)
    raw["data"] |= DATA.get(name, {})  # SANA's config check asks for a multiple of 32 px even without data
    train(from_dict(DiffusionTrainConfig, raw))
    steps = logged(tmp_path)
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        assert abs(record["ratio/min"] - 1) < 1e-5 and abs(record["ratio/max"] - 1) < 1e-5
        assert record["ratio/std"] < 1e-5 and record["approx_kl"] < 1e-10 and record["clip_ratio/region"] == 0
        assert record["grad_norm"] > 0 and record["reward/std"] > 0
    # Step 1 starts at the base model (LoRA B = 0): no KL; step 2 samples from the updated policy.
    assert steps[1]["kl_to_reference"] == 0 and steps[2]["kl_to_reference"] > 0
    assert any(value.abs().max() > 0 for key, value in final_weights(tmp_path).items() if "lora_B" in key)


# --- the objective, written out ------------------------------------------------------------------------------------


def sde_mean(x, v, sigma, next_sigma, level, sigma_cap):
    """Flow-GRPO's step mean μ = x(1 + σ_t²Δ/(2σ)) + v(1 + σ_t²(1 − σ)/(2σ))Δ, σ_t = a√(σ/(1 − σ)); s = σ_t√(−Δ)."""
    delta = next_sigma - sigma
    std_t = level * math.sqrt(sigma / (1 - (sigma_cap if sigma == 1 else sigma)))
    mean = x * (1 + std_t**2 * delta / (2 * sigma)) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * delta
    return mean, std_t, std_t * math.sqrt(-delta)


def guided_velocity(model, latents, sigma, embeds, empty, scale):
    cond = velocity_by_hand("sd3", model, latents, torch.full((len(latents),), sigma), embeds)
    uncond = velocity_by_hand("sd3", model, latents, torch.full((len(latents),), sigma), empty)
    return uncond + scale * (cond - uncond)


def flow_grpo_objective(family, policy, trajectory, prompts, rewards, ratios, steps, settings):
    """The loss of train_sd3.py per trained step, averaged: mean_i max(−A_i ρ_ij, −A_i clip(ρ_ij, 1 ± ε)) + β·KL_ij,
    KL_ij = mean_elems(μθ − μref)²/(2σ_t²); A from stat_tracking.py (global std, NumPy's population std), clamped ±5.
    Returns the loss, the per-element KLs and the old log-probs that give the chosen ``ratios``."""
    group = settings.group_size
    r = rewards.numpy()[:, 0].astype(np.float64)
    means = r.reshape(-1, group).mean(axis=1).repeat(group)
    advantages = torch.tensor(np.clip((r - means) / (np.std(r) + 1e-4), -5, 5), dtype=torch.float32)
    embeds = family.encode_prompts(prompts)
    empty = family.encode_prompts([""] * len(prompts))
    sigmas = trajectory.sigmas.tolist()
    level, scale, eps = settings.noise_level, settings.guidance_scale, settings.policy_gradient.epsilon_low
    losses, kls, old_logps = [], [], []
    for column, j in enumerate(steps):
        x, x_next = trajectory.latents[:, j], trajectory.latents[:, j + 1]
        v = guided_velocity(policy, x, sigmas[j], embeds, empty, scale)
        mean, std_t, std = sde_mean(x, v, sigmas[j], sigmas[j + 1], level, sigmas[1])
        log_density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        new_logp = log_density.mean(dim=(1, 2, 3))
        old_logp = new_logp.detach() - torch.log(ratios[:, column])
        old_logps.append(old_logp)
        rho = torch.exp(new_logp - old_logp)
        clipped = torch.clamp(rho, 1 - eps, 1 + eps)
        policy_term = torch.maximum(-advantages * rho, -advantages * clipped)
        policy.disable_adapters()
        with torch.no_grad():
            v_ref = guided_velocity(policy, x, sigmas[j], embeds, empty, scale)
        policy.enable_adapters()
        mean_ref, _, _ = sde_mean(x, v_ref, sigmas[j], sigmas[j + 1], level, sigmas[1])
        kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_t**2)
        kls.append(kl)
        losses.append((policy_term + settings.kl_beta * kl).mean())
    return torch.stack(losses).mean(), torch.stack(kls, dim=1), torch.stack(old_logps, dim=1)


def hand_built_step(family, method, trajectory_latents, old_logps, rewards, chunk_size=None, backward=None):
    """The method's loss on a given trajectory and rewards (its rollout and scorer replaced by them), the
    trajectories in rollout chunks of ``chunk_size`` (default: one chunk)."""
    prompts = [p for p in PROMPTS for _ in range(method.settings.group_size)]
    sigmas = family.inference_sigmas(method.settings.num_inference_steps, torch.device("cpu"))
    log_probs = torch.zeros(len(prompts), len(sigmas) - 1)
    log_probs[:, : old_logps.shape[1]] = old_logps
    stochastic = torch.ones(len(sigmas) - 1, dtype=torch.bool)
    trajectory = Trajectory(trajectory_latents, sigmas, stochastic, log_probs)
    size = chunk_size or len(prompts)
    chunks = [
        Rollout(prompts[rows], Trajectory(trajectory_latents[rows], sigmas, stochastic, log_probs[rows]))
        for rows in (slice(i, i + size) for i in range(0, len(prompts), size))
    ]
    method.rollout = lambda *args: chunks
    method.score = lambda samples, prompts: rewards
    context = TrainingContext(step=0, seed=0, noise_seeds=[1, 2], encode=None, backward=backward)
    return method.training_loss(family.denoiser, {"caption": PROMPTS}, context), trajectory


def test_the_loss_is_flow_grpos_objective_on_a_hand_built_trajectory(model_dirs):
    """Ratios on both sides of both clipping boundaries, for positive and negative advantages; the KL's gradient
    reaches the policy (it is computed outside the reference's no_grad)."""
    family = load_family(str(model_dirs["sd3"]), options=options("sd3"))
    policy = family.denoiser
    random_lora(policy)
    settings = grpo_settings(
        group_size=2,
        timestep_fraction=0.75,
        kl_beta=10.0,
        policy_gradient={"loss_type": "grpo", "epsilon_low": 0.2},
    )
    eps = 0.2
    # Rows: prompt 0 (rewards 0.2, 0.9: A < 0, A > 0), prompt 1 (0.5, 0.1: A > 0, A < 0); columns: trained steps 0-2.
    ratios = torch.tensor(
        [
            [1 - 2 * eps, 1 - eps / 2, 1 + 2 * eps],
            [1 + 2 * eps, 1 + eps / 2, 1 - 2 * eps],
            [1 - eps / 2, 1 + 2 * eps, 1.0],
            [1 + eps / 2, 1 - 2 * eps, 1 + 1.5 * eps],
        ]
    )
    rewards = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    latents = torch.randn(4, 5, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = family.inference_sigmas(4, torch.device("cpu"))
    trajectory = Trajectory(latents, sigmas, torch.ones(4, dtype=torch.bool), torch.zeros(4, 4))
    prompts = [p for p in PROMPTS for _ in range(2)]

    expected, expected_kl, old_logps = flow_grpo_objective(
        family, policy, trajectory, prompts, rewards, ratios, [0, 1, 2], settings
    )
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()

    method = FlowGRPO(family, ReferenceDenoiser(policy, frozen_copy=False), settings)
    output, _ = hand_built_step(family, method, latents, old_logps, rewards)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.metrics["kl_to_reference"], expected_kl.mean(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(output.metrics["ratio/min"], ratios.min(), rtol=1e-5, atol=0)
    torch.testing.assert_close(output.metrics["ratio/max"], ratios.max(), rtol=1e-5, atol=0)
    # Clipped where the ratio leaves [1 − ε, 1 + ε] in the direction the advantage pushes it.
    advantage_sign = torch.tensor([-1.0, 1.0, 1.0, -1.0]).unsqueeze(1)
    clipped = ((ratios > 1 + eps) & (advantage_sign > 0)) | ((ratios < 1 - eps) & (advantage_sign < 0))
    assert output.metrics["clip_ratio/region"].item() == pytest.approx(clipped.float().mean().item())
    output.loss.backward()
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-7)
    policy.zero_grad()

    # Without the KL the gradient differs by exactly β·∇KL: the KL is differentiable through the policy.
    no_kl = FlowGRPO(family, None, dataclasses.replace(settings, kl_beta=0.0))
    hand_built_step(family, no_kl, latents, old_logps, rewards)[0].loss.backward()
    kl_gradients = [expected_grads[n] - p.grad for n, p in policy.named_parameters() if p.requires_grad]
    assert max(g.abs().max() for g in kl_gradients) > 1e-6


# Per backward, the trajectory-steps recomputed with gradients: token-level ratios, one chunk of 2 at one step (2
# chunks × 3 steps); sequence ratios (GSPO, RLOO), one chunk at its 3 trained steps.
BY_STEP, BY_CHUNK = [2] * 6, [2 * 3] * 2


@pytest.mark.parametrize(
    ("policy_gradient", "held_per_backward"),
    [
        ({"loss_type": "grpo", "epsilon_low": 0.2}, BY_STEP),
        ({"loss_type": "dapo", "epsilon_low": 0.2, "epsilon_high": 0.28}, BY_STEP),
        ({"loss_type": "dr_grpo", "epsilon_low": 0.2}, BY_STEP),
        ({"loss_type": "dr_grpo", "epsilon_low": 0.2, "max_completion_length": 5}, BY_STEP),
        ({"loss_type": "bnpo", "epsilon_low": 0.2}, BY_STEP),
        ({"loss_type": "grpo", "importance_level": "sequence", "epsilon_low": 0.2}, BY_CHUNK),  # GSPO
        ({"loss_type": "rloo", "epsilon_low": 0.2}, BY_CHUNK),
    ],
    ids=["grpo", "dapo", "dr_grpo", "dr_grpo_length_5", "bnpo", "gspo", "rloo"],
)
def test_a_backward_per_part_gives_the_batch_gradient_and_holds_one_part(model_dirs, policy_gradient, held_per_backward):
    """Backpropagated a part at a time, the loss, metrics and gradient equal the one-graph ones for every loss type,
    and both equal the core's loss on the whole batch's log-probs in one call, while a backward holds the graphs of
    one part (a chunk of 2 trajectories at one step, or at its 3 steps for a sequence ratio), not the batch's 4
    trajectories × 3 steps."""
    family = load_family(str(model_dirs["sd3"]), options=options("sd3"))
    policy = family.denoiser
    torch.manual_seed(0)  # LoRA's weights, whatever ran before in this process
    random_lora(policy)
    settings = grpo_settings(
        group_size=2, timestep_fraction=0.75, kl_beta=10.0, policy_gradient=policy_gradient
    )
    ratios = torch.tensor([[0.6, 1.1, 1.5], [1.4, 0.95, 0.7], [0.9, 1.3, 1.0], [1.05, 0.75, 1.25]])
    rewards = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    latents = torch.randn(4, 5, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = family.inference_sigmas(4, torch.device("cpu"))
    trajectory = Trajectory(latents, sigmas, torch.ones(4, dtype=torch.bool), torch.zeros(4, 4))
    prompts = [p for p in PROMPTS for _ in range(2)]
    _, _, old_logps = flow_grpo_objective(family, policy, trajectory, prompts, rewards, ratios, [0, 1, 2], settings)
    policy.zero_grad()
    method = FlowGRPO(family, ReferenceDenoiser(policy, frozen_copy=False), settings)

    # The core's loss over all 4 × 3 elements in one call, plus β times the mean KL.
    log_probs = torch.zeros(4, 4)
    log_probs[:, :3] = old_logps
    batch = Rollout(prompts, Trajectory(latents, sigmas, torch.ones(4, dtype=torch.bool), log_probs))
    conditioning = family.sampling_inputs(prompts, settings.guidance_scale)
    new, old, kl = method.recompute(policy, batch, [0, 1, 2], conditioning)
    advantages = method.group_advantages(rewards)
    core = policy_gradient_loss(new, old, advantages, torch.ones_like(new), settings.policy_gradient)
    expected = core.loss + settings.kl_beta * kl.mean()
    expected.backward()
    whole_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()

    whole, _ = hand_built_step(family, method, latents, old_logps, rewards)
    assert not whole.backpropagated
    torch.testing.assert_close(whole.loss, expected, rtol=0, atol=1e-6)

    pending, held = [0], []
    transition_log_prob = family.transition_log_prob

    def counted(denoiser, latents, *arguments):
        if torch.is_grad_enabled():  # the policy's calls; the reference's run under no_grad
            pending[0] += len(latents)
        return transition_log_prob(denoiser, latents, *arguments)

    def backward(part):
        held.append(pending[0])
        pending[0] = 0
        part.backward()

    family.transition_log_prob = counted
    chunked, _ = hand_built_step(family, method, latents, old_logps, rewards, chunk_size=2, backward=backward)
    assert chunked.backpropagated and not chunked.loss.requires_grad
    assert held == held_per_backward
    # The loss sums terms of both signs (positive and negative advantages) that are far larger than it: fp32 rounding
    # of the terms, not of the sum, sets the tolerance.
    torch.testing.assert_close(chunked.loss, expected.detach(), rtol=0, atol=1e-6)
    for name in ("ratio/min", "ratio/max", "clip_ratio/region", "kl_to_reference"):
        torch.testing.assert_close(chunked.metrics[name], whole.metrics[name], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(chunked.metrics["ratio/max"], core.metrics["ratio/max"], rtol=1e-6, atol=0)
    largest = max(g.abs().max() for g in whole_grads.values())
    assert largest > 1e-4
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, whole_grads[name], rtol=1e-5, atol=1e-5 * largest.item())


def test_advantages_are_flow_grpos_per_prompt_and_batch_statistics():
    """stat_tracking.py: A = (r − mean of the prompt's rewards) / (std + 1e-4), std over the whole batch
    (global_std) or over the prompt's rewards, NumPy's population std; then clamped to ±adv_clip_max."""
    r = np.array([0.1, 0.5, 0.9, 0.3, 0.3, 0.31, 0.0, 1.0, 0.2], dtype=np.float32)
    means = r.reshape(3, 3).mean(axis=1).repeat(3)
    per_prompt_std = r.reshape(3, 3).std(axis=1).repeat(3)
    cases = [
        ({}, np.clip((r - means) / (r.std() + 1e-4), -5, 5)),
        ({"scale": "group"}, np.clip((r - means) / (per_prompt_std + 1e-4), -5, 5)),
        ({"scale": "group", "clip": 1.0}, np.clip((r - means) / (per_prompt_std + 1e-4), -1, 1)),
    ]
    for advantages, expected in cases:
        method = FlowGRPO(None, None, grpo_settings(advantages=advantages))
        computed = method.group_advantages(torch.from_numpy(r).unsqueeze(1))
        np.testing.assert_allclose(computed.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(cases[1][1]).max() > 1  # the clamp of the last case engages
    # Two weighted rewards are summed before the advantage (TRL's and MixGRPO's sum_then_normalize).
    second = np.linspace(1, 0, 9, dtype=np.float32)
    two_rewards = [{"name": "test_mean_red"}, {"name": "test_mean_red", "weight": 0.5}]
    method = FlowGRPO(None, None, grpo_settings(rewards=two_rewards))
    total = r + 0.5 * second
    expected = np.clip((total - total.reshape(3, 3).mean(axis=1).repeat(3)) / (total.std() + 1e-4), -5, 5)
    computed = method.group_advantages(torch.from_numpy(np.stack([r, second], axis=1)))
    np.testing.assert_allclose(computed.numpy(), expected, rtol=1e-5, atol=1e-5)


# --- which steps are trained ---------------------------------------------------------------------------------------


def test_the_trained_steps_all_but_the_last_or_a_window():
    stochastic, trained = step_plan(grpo_settings(num_inference_steps=10), step=0, seed=0)
    assert stochastic.all() and trained.tolist() == [True] * 9 + [False]  # int(10 · 0.99) = 9
    fixed = grpo_settings(
        num_inference_steps=10,
        trained_steps="window",
        window_size=3,
        window_placement="fixed",
        window_range=[2, 8],
    )
    stochastic, trained = step_plan(fixed, step=7, seed=0)
    assert torch.equal(stochastic, trained) and trained.nonzero().flatten().tolist() == [2, 3, 4]
    # Flow-GRPO-Fast: a random start in [low, high − size], the same for a given (seed, step) wherever it is drawn.
    random = dataclasses.replace(fixed, window_placement="random")
    starts = [int(step_plan(random, step=step, seed=5)[1].nonzero()[0]) for step in range(200)]
    assert set(starts) == {2, 3, 4, 5}
    assert starts == [int(step_plan(random, step, 5)[1].nonzero()[0]) for step in range(200)]
    assert all(step_plan(random, step, 5)[1].sum() == 3 for step in range(20))
    # MixGRPO: one step later every window_shift_every optimizer steps, wrapping round inside the range.
    progressive = dataclasses.replace(fixed, window_placement="progressive", window_shift_every=2)
    starts = [int(step_plan(progressive, step, 0)[1].nonzero()[0]) for step in range(10)]
    assert starts == [2, 2, 3, 3, 4, 4, 5, 5, 2, 2]
    default_range = grpo_settings(num_inference_steps=10, trained_steps="window", window_size=2)
    assert {int(step_plan(default_range, step, 1)[1].nonzero()[0]) for step in range(100)} == {0, 1, 2, 3}


def test_a_window_rollout_is_the_ode_outside_the_window_and_groups_may_share_its_start(model_dirs):
    family = load_family(str(model_dirs["sd3"]), options=options("sd3"))
    random_lora(family.denoiser)
    settings = grpo_settings(
        trained_steps="window",
        window_size=2,
        window_placement="fixed",
        window_range=[1, 4],
        generation_batch_size=6,
    )
    method = FlowGRPO(family, None, settings)
    stochastic, _ = step_plan(settings, 0, 0)
    prompts = [p for p in PROMPTS for _ in range(3)]
    (rollout,) = method.rollout(family.denoiser, prompts, list(range(6)), stochastic)
    log_probs = rollout.trajectory.log_probs
    assert (log_probs[:, [1, 2]] != 0).all() and (log_probs[:, [0, 3]] == 0).all()
    ode = family.sample_trajectory(
        family.denoiser,
        prompts,
        [torch.Generator().manual_seed(s) for s in range(6)],
        num_inference_steps=4,
        guidance_scale=3.0,
    )
    # The same chain up to the window, then the SDE.
    assert torch.equal(rollout.trajectory.latents[:, :2], ode.latents[:, :2])
    assert not torch.equal(rollout.trajectory.latents[:, 2], ode.latents[:, 2])

    # With a shared initial noise a group is one chain up to the window and branches inside it.
    initial = method.shared_initial_noise(family.denoiser, [11, 12])
    (shared,) = method.rollout(family.denoiser, prompts, list(range(6)), stochastic, initial)
    chains = shared.trajectory.latents.view(2, 3, 5, -1)
    assert all(torch.equal(chains[g, 0, :2], chains[g, k, :2]) for g in range(2) for k in (1, 2))
    assert not torch.equal(chains[0, 0, :1], chains[1, 0, :1])  # each prompt's own noise
    assert all(not torch.equal(chains[g, 0, 2], chains[g, k, 2]) for g in range(2) for k in (1, 2))
    torch.testing.assert_close(
        initial, method.shared_initial_noise(family.denoiser, [11, 12]), rtol=0, atol=0
    )


# --- resume and processes ------------------------------------------------------------------------------------------


def test_a_crash_after_a_checkpoint_resumes_exactly(model_dirs, tmp_path, monkeypatch):
    """Killed in step 3 after the step-2 checkpoint, then run.resume=latest: the same rewards, losses and weights as
    an uninterrupted run (random window placement, prompts wrapping round the 3-prompt dataset)."""
    grpo = {"trained_steps": "window", "window_size": 2, "window_range": [0, 4]}
    train(config_for(model_dirs["sd3"], tmp_path / "full", grpo, max_steps=4))

    calls = {"count": 0}
    original = FlowGRPO.training_loss

    def crashing(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowGRPO, "training_loss", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        train(config_for(model_dirs["sd3"], tmp_path / "split", grpo, max_steps=4))
    monkeypatch.setattr(FlowGRPO, "training_loss", original)
    saved = [
        path.name for path in (tmp_path / "split" / "checkpoints").iterdir() if path.name.startswith("step")
    ]
    assert saved == ["step-0000002"]
    train(config_for(model_dirs["sd3"], tmp_path / "split", grpo, max_steps=4, resume="latest"))

    full, split = logged(tmp_path / "full"), logged(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4] and len({record["reward/mean"] for record in full.values()}) == 4
    for name in ("loss", "reward/mean", "grad_norm", "ratio/max"):
        assert [split[step][name] for step in range(1, 5)] == [full[step][name] for step in range(1, 5)], name
    full_weights, split_weights = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(split_weights[key], value) for key, value in full_weights.items())


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(model_dirs, tmp_path):
    """Each process samples its items' groups; the advantages' batch std spans both processes' rewards. Chunks of
    2 trajectories: each process backpropagates 2 parts of its micro-batch (one process 3), each synchronised."""

    def launch(output: Path, processes: int, batch_size: int) -> None:
        config = output.with_suffix(".json")
        grpo = {"generation_batch_size": 2}
        config.write_text(
            json.dumps(raw_config(model_dirs["sd3"], output, grpo, max_steps=3, batch_size=batch_size))
        )
        torchrun(processes, str(TESTS / "grpo_worker.py"), str(config))

    launch(tmp_path / "single", 1, batch_size=2)
    launch(tmp_path / "double", 2, batch_size=1)
    single, double = logged(tmp_path / "single"), logged(tmp_path / "double")
    assert (
        sorted(single) == sorted(double) == [1, 2, 3]
        and len({r["reward/mean"] for r in single.values()}) == 3
    )
    # Sampling one prompt's group per process instead of two together rounds the samples differently; dividing by
    # the batch's reward std magnifies that in the advantages (2e-5 relative at step 1 in one run).
    tolerance = {"reward/mean": 1e-5, "grad_norm": 1e-5, "advantage/abs_mean": 1e-4}
    for step in single:
        for name, rel in tolerance.items():
            assert double[step][name] == pytest.approx(single[step][name], rel=rel, abs=1e-7), (step, name)
    single_weights, double_weights = final_weights(tmp_path / "single"), final_weights(tmp_path / "double")
    # The same rounding reaches the weights after 3 steps: 1.8e-7 at most on an AMD EPYC. An advantage normalised
    # per process instead of over the global batch changes the step itself, far beyond 1e-6.
    for key, value in single_weights.items():
        torch.testing.assert_close(double_weights[key], value, rtol=1e-5, atol=1e-6)


# --- refusals ------------------------------------------------------------------------------------------------------


def test_the_config_refuses_what_grpo_cannot_train(model_dirs, tmp_path):
    sd_dir = build_tiny_sd(tmp_path / "sd")
    with pytest.raises(
        ConfigError, match="'grpo' needs a flow-matching .rectified-flow. model, which StableDiffusion"
    ):
        config_for(sd_dir, tmp_path / "out")
    raw = raw_config(model_dirs["sd3"], tmp_path / "out")
    with pytest.raises(ConfigError, match="remove the loss: section"):
        from_dict(DiffusionTrainConfig, {**raw, "loss": {"type": ["kto"]}})
    raw["model"]["lora"]["dropout"] = 0.1
    with pytest.raises(ConfigError, match="dropout would make the ratio differ from 1"):
        from_dict(DiffusionTrainConfig, raw)
    for settings, message in [
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"trained_steps": "window", "window_size": 3, "window_range": [2, 4]}, "hold window_size=3"),
        ({"timestep_fraction": 0.2}, "trains at least one"),
        ({"policy_gradient": {"beta": 0.1}}, "set method.grpo.kl_beta"),
        ({"advantages": {"reward_weights": [1.0]}}, r"rewards\[i\].weight"),
        ({"noise_level": 0.0}, "noise_level must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            grpo_settings(**settings)
    assert not config_for(model_dirs["sd3"], tmp_path / "out").uses_reference
    assert config_for(model_dirs["sd3"], tmp_path / "out", {"kl_beta": 0.1}).uses_reference
