"""DDIM-InPO on tiny SD1.5-like and SDXL-like models: the loss re-derived along the official procedure
(diffusers' inverse scheduler, η·σ jitter, reparametrised ε*, Diffusion-DPO), options, training steps."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler
from helpers import diffusion_config, latent_pairs, lora_policy, method_settings, trained_weights_changed
from tiny_pipelines import build_tiny_sd

from diffalign.config import ConfigError, from_dict
from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import pair_noise
from diffalign.diffusion.methods.inpo import JITTER_STREAM, DDIMInPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import train
from diffalign.losses import LossConfig, compute_loss


def official_inverted_pair(
    family, model, batch, pair, timestep, *, eta, exact_timestep, start_alpha="scheduler"
):
    """x_t* of pair ``pair`` (chosen, rejected) as the official code computes it, member by member in lockstep.

    diffusers' DDIMInverseScheduler built from the model's scheduler config (``set_alpha_to_one: false`` in the
    tiny pipelines as in SD1.5, so the first step starts from ᾱ = alphas_cumprod[0]; ``start_alpha="one"``
    overrides it to 1) over the 10-step grid below t, then η·√(DDIM variance between the level reached and 100
    above)·z, z drawn chosen-then-rejected from the pair's jitter generator. One deliberate difference from the
    official script: the level above 901 is capped at 999 where the script indexes past the schedule. With
    ``exact_timestep`` one more DDIM step goes to t itself, the model evaluated at t.
    """
    config = family.noise_scheduler.config
    assert config.set_alpha_to_one is False
    overrides = {"set_alpha_to_one": True} if start_alpha == "one" else {}
    inverse = DDIMInverseScheduler.from_config(config, **overrides)
    inverse.set_timesteps(10)
    variance_of = DDIMScheduler.from_config(config)._get_variance
    alphas = family.noise_scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(batch.noise_seeds[pair] ^ JITTER_STREAM)
    latents = torch.stack([batch.chosen_latents[pair], batch.rejected_latents[pair]])
    embeds = {
        name: value[pair : pair + 1].repeat(2, *[1] * (value.ndim - 1))
        for name, value in batch.prompt_embeds.items()
    }
    inputs = family.denoiser_inputs(embeds, {})

    def jitter(level):
        sigma = variance_of(min(level + 100, 999), level).sqrt()
        return eta * sigma * torch.cat([torch.randn((1, 4, 8, 8), generator=generator) for _ in range(2)])

    x = latents.clone()
    alpha_previous = inverse.initial_alpha_cumprod
    with torch.no_grad():
        for level in inverse.timesteps[inverse.timesteps < timestep]:
            noise = model(x, level.repeat(2), **inputs).sample
            x = inverse.step(noise, level, x).prev_sample + jitter(int(level))
            alpha_previous = alphas[level]
        if exact_timestep:
            noise = model(x, torch.tensor([timestep] * 2), **inputs).sample
            clean = (x - (1 - alpha_previous).sqrt() * noise) / alpha_previous.sqrt()
            x = alphas[timestep].sqrt() * clean + (1 - alphas[timestep]).sqrt() * noise + jitter(timestep)
    return latents, x, inputs


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
@pytest.mark.parametrize(
    ("inversion_model", "exact_timestep", "start_alpha"),
    [("reference", False, "scheduler"), ("policy", True, "scheduler"), ("policy", False, "one")],
)
def test_inpo_loss_equals_the_official_procedure(
    sd_sdxl_dirs, family_name, inversion_model, exact_timestep, start_alpha
):
    """L = −log σ(−½β[(Lθ_w − Lθ_l) − (Lref_w − Lref_l)]), L = mean (ε_model(x_t*, t) − ε*)², β = 2000,
    ε* = (x_t* − √ᾱ_t·x0)/√(1−ᾱ_t), written out here per pair."""
    family = load_family(str(sd_sdxl_dirs[family_name]))
    policy = lora_policy(family)
    batch = latent_pairs(family)
    settings = method_settings(
        "inpo",
        inversion_model=inversion_model,
        invert_to_exact_timestep=exact_timestep,
        inversion_start_alpha=start_alpha,
    )
    method = DDIMInPO(family, ReferenceDenoiser(policy, frozen_copy=False), settings)
    scores, _ = method.pair_scores(policy, batch)
    loss = compute_loss(scores, LossConfig(type=["sigmoid"], beta=2000.0)).loss

    _, timesteps = pair_noise(family, batch)  # t for each pair, from its seed
    alphas = family.noise_scheduler.alphas_cumprod
    reference = AdaptersDisabled(policy)
    inverter = policy if inversion_model == "policy" else reference
    inside = []
    for pair, timestep in enumerate(timesteps.tolist()):
        latents, inverted, inputs = official_inverted_pair(
            family,
            inverter,
            batch,
            pair,
            timestep,
            eta=0.1,
            exact_timestep=exact_timestep,
            start_alpha=start_alpha,
        )
        alpha = alphas[timestep]
        noise = (inverted - alpha.sqrt() * latents) / (1 - alpha).sqrt()
        with torch.no_grad():
            policy_w, policy_l = (
                (policy(inverted, torch.tensor([timestep] * 2), **inputs).sample - noise) ** 2
            ).mean(dim=(1, 2, 3))
            ref_w, ref_l = (
                (reference(inverted, torch.tensor([timestep] * 2), **inputs).sample - noise) ** 2
            ).mean(dim=(1, 2, 3))
        ours = torch.stack([scores.policy_chosen[pair], scores.policy_rejected[pair]]).detach()
        torch.testing.assert_close(ours, -0.5 * torch.stack([policy_w, policy_l]), atol=1e-6, rtol=1e-4)
        inside.append(-0.5 * 2000 * ((policy_w - policy_l) - (ref_w - ref_l)))
    official = -F.logsigmoid(torch.stack(inside)).mean()
    assert abs(official.item() - np.log(2)) > 1e-3  # the policy differs from the reference
    torch.testing.assert_close(loss.detach(), official, atol=1e-5, rtol=1e-4)


class AdaptersDisabled(torch.nn.Module):
    """Calls ``model`` with its LoRA adapters switched off: the reference, while the policy keeps them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        self.model.disable_adapters()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.enable_adapters()


def test_inversion_starts_where_the_scheduler_config_says_by_default(sd_sdxl_dirs):
    """The tiny pipelines' config (as SD1.5's) has set_alpha_to_one: false: the default start is
    alphas_cumprod[0], as the official code's inverse scheduler; ``one`` keeps ᾱ = 1."""
    family = load_family(str(sd_sdxl_dirs["sd"]))
    default = DDIMInPO(family, None, method_settings("inpo", inversion_model="policy"))
    assert default.start_alpha == pytest.approx(family.noise_scheduler.alphas_cumprod[0].item())
    assert default.start_alpha < 1.0
    one = DDIMInPO(family, None, method_settings("inpo", inversion_model="policy", inversion_start_alpha="one"))
    assert one.start_alpha == 1.0


def test_reference_free_losses_need_the_policy_to_invert(sd_sdxl_dirs):
    family = load_family(str(sd_sdxl_dirs["sd"]))
    with pytest.raises(ConfigError, match="inversion_model: policy"):
        from_dict(DiffusionTrainConfig, {"method": {"name": "inpo"}, "loss": {"type": ["cpo"]}})
    method = DDIMInPO(family, None, method_settings("inpo", inversion_model="policy"))
    scores, _ = method.pair_scores(family.denoiser, latent_pairs(family))
    assert not scores.has_reference
    assert torch.isfinite(compute_loss(scores, LossConfig(type=["cpo"], beta=4000.0)).loss)


def test_v_prediction_regresses_the_velocity_of_the_reparametrised_noise(tmp_path):
    """v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x0 with ε* from x_t*: the v-prediction form of the same target."""
    family = load_family(str(build_tiny_sd(tmp_path / "v", prediction_type="v_prediction")))
    policy = family.denoiser
    batch = latent_pairs(family)
    method = DDIMInPO(family, None, method_settings("inpo", inversion_model="policy", inversion_eta=0.0))
    scores, _ = method.pair_scores(policy, batch)

    _, timesteps = pair_noise(family, batch)
    timesteps = timesteps.repeat(2)
    inputs = family.denoiser_inputs(batch.both_prompt_embeds(), {})
    inverted = method.invert(policy, batch, timesteps, inputs)
    latents = batch.both_latents()
    alpha = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noise = (inverted - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    with torch.no_grad():
        errors = ((policy(inverted, timesteps, **inputs).sample - velocity) ** 2).mean(dim=(1, 2, 3))
    ours = torch.cat([scores.policy_chosen, scores.policy_rejected]).detach()
    torch.testing.assert_close(ours, -0.5 * errors, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_one_inpo_training_step(sd_sdxl_dirs, pairs_file, tmp_path, family_name, trainable):
    config = diffusion_config(
        sd_sdxl_dirs[family_name],
        pairs_file,
        tmp_path,
        model={"trainable": trainable},
        method={"name": "inpo"},
        loss={"type": ["sigmoid"], "beta": 2000.0},
    )
    metrics = train(config)
    # policy = reference before the first update (up to fp32 roundoff amplified by β)
    assert abs(metrics["loss"] - np.log(2)) < 1e-3
    assert metrics["grad_norm"] > 0
    assert trained_weights_changed(tmp_path, sd_sdxl_dirs[family_name], trainable)
