"""DDIM inversion: exact round trips in worlds where the model is exact, parity with diffusers' inverse
scheduler, and a step-by-step re-derivation (with jitter) on a tiny U-Net."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDPMScheduler, UNet2DConditionModel

from diffalign.diffusion.inversion import (
    ddim_invert,
    ddim_sample,
    inversion_grid,
    inversion_start_alpha,
    split_prediction,
)

SD_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler.from_config(SD_SCHEDULER).alphas_cumprod


def test_grid_is_the_sd_ddim_inference_grid():
    assert inversion_grid(SD_SCHEDULER, 10).tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


@pytest.mark.parametrize("exact_timestep", [False, True])
def test_constant_noise_world_round_trip_is_exact(exact_timestep):
    """A model whose ε̂ ignores its input makes every DDIM move exact: x_s = √ᾱ_s·x0 + √(1−ᾱ_s)·ε0."""
    torch.manual_seed(0)
    latents, constant_noise = torch.randn(5, 4, 6, 6), torch.randn(5, 4, 6, 6)
    alphas = alphas_cumprod()
    grid = inversion_grid(SD_SCHEDULER, 10)
    timesteps = torch.tensor([0, 1, 150, 901, 999])

    def predict(sample, levels):
        return constant_noise

    inverted = ddim_invert(latents, predict, alphas, grid, timesteps, exact_timestep=exact_timestep)
    # Largest grid point strictly below t (none for t ∈ {0, 1}: those stay clean), or t itself.
    landing = [-1, -1, 101, 801, 901] if not exact_timestep else timesteps.tolist()
    for i, level in enumerate(landing):
        alpha = torch.tensor(1.0) if level < 0 else alphas[level]
        expected = alpha.sqrt() * latents[i] + (1 - alpha).sqrt() * constant_noise[i]
        torch.testing.assert_close(inverted[i], expected, atol=1e-5, rtol=1e-5)

    restored = ddim_sample(inverted, predict, alphas, grid, torch.tensor(landing))
    torch.testing.assert_close(restored, latents, atol=1e-4, rtol=1e-4)


def gaussian_world_epsilon(mean: float, std: float, alphas: torch.Tensor):
    """The exact ε-prediction when x0 ~ N(mean, std²) per dimension: ε = √(1−ᾱ)·(x − √ᾱ·m)/(ᾱ·s² + 1 − ᾱ)."""

    def predict(sample, levels):
        alpha = alphas[levels].view(-1, 1, 1, 1)
        return (1 - alpha).sqrt() * (sample - alpha.sqrt() * mean) / (alpha * std**2 + 1 - alpha)

    return predict


def test_gaussian_world_inversion_reaches_the_marginal_and_sampling_undoes_it():
    """With the exact ε of a Gaussian data distribution, inversion maps data onto the noisy marginal
    N(√ᾱ·m, ᾱ·s² + 1 − ᾱ) and DDIM sampling maps it back: both discretise one ODE, so the round-trip error
    shrinks in proportion to the grid spacing (first order)."""
    mean, std = 0.4, 0.5
    torch.manual_seed(1)
    latents = mean + std * torch.randn(64, 4, 8, 8)
    alphas = alphas_cumprod()
    timesteps = torch.full((64,), 800)
    predict = gaussian_world_epsilon(mean, std, alphas)
    alpha = alphas[800]

    errors = {}
    for num_steps in (50, 200, 1000):
        grid = inversion_grid(SD_SCHEDULER, num_steps)
        inverted = ddim_invert(latents, predict, alphas, grid, timesteps, exact_timestep=True)
        assert abs(inverted.mean().item() - alpha.sqrt().item() * mean) < 0.02
        assert abs(inverted.std().item() - (alpha * std**2 + 1 - alpha).sqrt().item()) < 0.02
        restored = ddim_sample(inverted, predict, alphas, grid, timesteps)
        errors[num_steps] = ((restored - latents).norm() / latents.norm()).item()
    assert errors[1000] < 3e-3
    assert errors[50] / errors[200] > 3 and errors[200] / errors[1000] > 3


def test_v_prediction_split_recovers_clean_latent_and_noise():
    torch.manual_seed(2)
    clean, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    alpha = torch.tensor([0.9, 0.5, 0.05]).view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
    clean_hat, noise_hat = split_prediction(velocity, noisy, alpha, "v_prediction")
    torch.testing.assert_close(clean_hat, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_hat, noise, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_eta_zero_matches_diffusers_inverse_scheduler(tiny_unet, set_alpha_to_one):
    """η = 0 and one t for the batch: diffusers' DDIMInverseScheduler over the grid below t, its clean level
    ᾱ_start taken from the config as diffusers does (alphas_cumprod[0] without set_alpha_to_one)."""
    torch.manual_seed(3)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    config = {**SD_SCHEDULER, "set_alpha_to_one": set_alpha_to_one}
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(10)
    expected = latents.clone()
    with torch.no_grad():
        for timestep in inverse.timesteps[inverse.timesteps < 640]:
            noise = tiny_unet(expected, timestep, context).sample
            expected = inverse.step(noise, timestep, expected).prev_sample

    def predict(sample, levels):
        return tiny_unet(sample, levels, context).sample

    grid = inversion_grid(config, 10)
    start = inversion_start_alpha(config)
    ours = ddim_invert(latents, predict, alphas_cumprod(), grid, torch.tensor([640, 640]), start_alpha=start)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_sd15_inversion_starts_from_the_first_alphas_cumprod():
    """SD1.5's scheduler config (set_alpha_to_one: false): ᾱ_start = alphas_cumprod[0] = 0.99915, and the first
    step is x_1 = √ᾱ_1·(x_0 − √(1−ᾱ_start)·ε̂)/√ᾱ_start + √(1−ᾱ_1)·ε̂, written out here."""
    config = json.loads((Path(__file__).parents[1] / "configs/models/sd15/scheduler.json").read_text())
    alphas = DDPMScheduler.from_config(config).alphas_cumprod
    start = inversion_start_alpha(config)
    assert start == pytest.approx(alphas[0].item()) and start == pytest.approx(0.99915, abs=1e-5)
    assert inversion_start_alpha({**config, "set_alpha_to_one": True}) == 1.0

    torch.manual_seed(5)
    latents, noise = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    grid = inversion_grid(config, 10)
    inverted = ddim_invert(
        latents, lambda sample, levels: noise, alphas, grid, torch.tensor([50]), start_alpha=start
    )
    first = alphas[1].double()
    start = torch.tensor(start, dtype=torch.float64)
    clean = (latents.double() - (1 - start).sqrt() * noise.double()) / start.sqrt()
    expected = first.sqrt() * clean + (1 - first).sqrt() * noise.double()
    torch.testing.assert_close(inverted, expected.float(), atol=1e-6, rtol=1e-6)
    # ᾱ_start = 1 lands elsewhere: the two starts differ by about 1% of the latent.
    from_one = ddim_invert(latents, lambda sample, levels: noise, alphas, grid, torch.tensor([50]))
    assert ((inverted - from_one).norm() / inverted.norm()).item() > 1e-3


@pytest.mark.parametrize("exact_timestep", [False, True])
def test_tiny_unet_inversion_with_jitter_matches_step_by_step_formula(tiny_unet, exact_timestep):
    """Per sample, written out: for each grid point s < t (then t itself when exact),
    ε̂ = ε_θ(x, s); x̂0 = (x − √(1−ᾱ_prev)·ε̂)/√ᾱ_prev; x = √ᾱ_s·x̂0 + √(1−ᾱ_s)·ε̂ + η·σ_s·z, with
    σ_s² = (1−ᾱ_s)/(1−ᾱ_{s+100})·(1 − ᾱ_{s+100}/ᾱ_s) (s+100 capped at 999) and z from the sample's generator."""
    torch.manual_seed(4)
    latents, context = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    timesteps = torch.tensor([60, 420, 999])
    eta, seeds = 0.1, [11, 12, 13]
    alphas = alphas_cumprod().double()
    grid = inversion_grid(SD_SCHEDULER, 10)

    def predict(sample, levels):
        return tiny_unet(sample, levels, context).sample

    ours = ddim_invert(
        latents,
        predict,
        alphas_cumprod(),
        grid,
        timesteps,
        exact_timestep=exact_timestep,
        eta=eta,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
    )

    for i in range(3):
        generator = torch.Generator().manual_seed(seeds[i])
        t = int(timesteps[i])
        levels = [int(s) for s in grid if s < t] + ([t] if exact_timestep else [])
        x = latents[i : i + 1].double()
        alpha_previous = torch.tensor(1.0, dtype=torch.float64)
        for level in levels:
            with torch.no_grad():
                noise = tiny_unet(x.float(), torch.tensor([level]), context[i : i + 1]).sample.double()
            clean = (x - (1 - alpha_previous).sqrt() * noise) / alpha_previous.sqrt()
            alpha = alphas[level]
            x = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
            alpha_above = alphas[min(level + 100, 999)]
            sigma = ((1 - alpha) / (1 - alpha_above) * (1 - alpha_above / alpha)).sqrt()
            x = x + eta * sigma * torch.randn((1, 4, 8, 8), generator=generator).double()
            alpha_previous = alpha
        torch.testing.assert_close(ours[i : i + 1], x.float(), atol=1e-4, rtol=1e-4)


def test_inversion_keeps_the_callers_dtype(tiny_unet):
    latents = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    seen = []

    def predict(sample, levels):
        seen.append(sample.dtype)
        return torch.zeros_like(sample)

    out = ddim_invert(
        latents, predict, alphas_cumprod(), inversion_grid(SD_SCHEDULER, 10), torch.tensor([500, 900])
    )
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
