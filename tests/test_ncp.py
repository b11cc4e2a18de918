"""NCP on tiny SD1.5-like and SDXL-like models: the loss re-derived along the official procedure (DDPM step,
the U-Net's conv_in → down (→ mid) states of the pretrained weights, official β convention), every objective,
the frozen encoder, training steps."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from helpers import diffusion_config, latent_pairs, lora_policy, method_settings, trained_weights_changed

from diffalign.config import ConfigError, from_dict
from diffalign.diffusion.config import DiffusionTrainConfig, MethodConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import pair_noise
from diffalign.diffusion.methods.ncp import STEP_STREAM, NoiseConditionedPerception, ddpm_step
from diffalign.diffusion.models import make_trainable
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import train
from diffalign.losses import LossConfig, compute_loss

OFFICIAL_BETA = 2500.0  # the official scripts' β, written without the ½ of our −½·error scores
OUR_BETA = 2 * OFFICIAL_BETA


def official_states(
    unet: UNet2DConditionModel, sample, timestep, inputs, use_mid: bool
) -> list[torch.Tensor]:
    """conv_in → down blocks (→ mid block) as the official ``get_unet_middle_states`` runs them."""
    hidden_states = inputs["encoder_hidden_states"]
    embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    extra = unet.get_aug_embed(
        emb=embedding,
        encoder_hidden_states=hidden_states,
        added_cond_kwargs=inputs.get("added_cond_kwargs", {}),
    )
    if extra is not None:
        embedding = embedding + extra
    state = unet.conv_in(sample)
    states = [state]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            state, _ = block(hidden_states=state, temb=embedding, encoder_hidden_states=hidden_states)
        else:
            state, _ = block(hidden_states=state, temb=embedding)
        states.append(state)
    if use_mid:
        states.append(unet.mid_block(state, embedding, encoder_hidden_states=hidden_states))
    return states


def official_features(states: list[torch.Tensor], concatenate: bool, normalize: bool) -> torch.Tensor:
    """The official ``concat_intermediate_steps``: every state viewed at the smallest resolution, channels
    scaled by C_last/C_state when normalising, concatenated on channels."""
    if not concatenate:
        return states[-1]
    batch, channels, height, width = states[-1].shape
    reshaped = [state.reshape(batch, -1, height, width) for state in states]
    if normalize:
        reshaped = [state * (channels / state.shape[1]) for state in reshaped]
    return torch.cat(reshaped, dim=1)


def test_ddpm_step_is_diffusers_ddpm_scheduler_step():
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    torch.manual_seed(0)
    noisy, epsilon = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    for t in (0, 1, 500, 999):
        alpha = scheduler.alphas_cumprod[t]
        clean = (noisy - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        step_noise = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(t))
        expected = scheduler.step(epsilon, t, noisy, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = ddpm_step(clean, noisy, torch.tensor([t]), scheduler.alphas_cumprod, step_noise)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


CASES = {
    # official defaults: x_{t−1} encoded at t−1 by the last down block
    "previous_step": {"encoded_latent": "previous_step"},
    # --timestep_type 0 --method both --use_middle_states --collect/normalize_intermediate_steps
    "clean_at_zero+mid+normalized+latent": {
        "encoded_latent": "clean_at_zero",
        "add_latent_error": True,
        "encoder_output": "mid",
        "concatenate_states": True,
        "normalize_states": True,
        "feature_error_weight": 0.5,
    },
    # --timestep_type uni --collect_intermediate_steps
    "clean_at_random_t+concatenated": {"encoded_latent": "clean_at_random_t", "concatenate_states": True},
}


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_ncp_loss_equals_the_official_procedure(sd_sdxl_dirs, family_name, case):
    """logits = (Lref_w − Lref_l) − (Lθ_w − Lθ_l) with L = c·mean (E(x̂) − E(x_target))² [+ latent MSE];
    official loss −log σ(2500·logits) = ours with β = 5000."""
    settings = CASES[case]
    family = load_family(str(sd_sdxl_dirs[family_name]))
    policy = lora_policy(family)
    batch = latent_pairs(family)
    method = NoiseConditionedPerception(
        family, ReferenceDenoiser(policy, frozen_copy=False), method_settings("ncp", **settings)
    )
    scores, _ = method.pair_scores(policy, batch)
    output = compute_loss(scores, LossConfig(type=["sigmoid"], beta=OUR_BETA))

    # Randomness of each pair, from its seeds: ε and t, then the DDPM-step noise z and a uniform t'.
    noise, timesteps = pair_noise(family, batch)
    seeds = [seed ^ STEP_STREAM for seed in batch.noise_seeds]
    step_noise, random_timesteps = pair_noise(family, dataclasses.replace(batch, noise_seeds=seeds))
    noise, timesteps, step_noise = torch.cat([noise, noise]), timesteps.repeat(2), torch.cat([step_noise] * 2)
    assert (timesteps > 0).all()
    latents = batch.both_latents()
    inputs = family.denoiser_inputs(batch.both_prompt_embeds(), {})
    alphas = family.noise_scheduler.alphas_cumprod
    alpha = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    def encoded(clean):
        if settings["encoded_latent"] != "previous_step":
            return clean
        alpha_previous = alphas[timesteps - 1].view(-1, 1, 1, 1)
        beta = 1 - alpha / alpha_previous
        mean = (alpha_previous.sqrt() * beta * clean + (1 - beta).sqrt() * (1 - alpha_previous) * noisy) / (
            1 - alpha
        )
        return mean + ((1 - alpha_previous) / (1 - alpha) * beta).sqrt() * step_noise

    encoder_timesteps = {
        "previous_step": timesteps - 1,
        "clean_at_zero": torch.zeros_like(timesteps),
        "clean_at_random_t": random_timesteps.repeat(2),
    }[settings["encoded_latent"]]
    use_mid = settings.get("encoder_output") == "mid"
    concatenate, normalize = (
        settings.get("concatenate_states", False),
        settings.get("normalize_states", False),
    )
    weight = settings.get("feature_error_weight", 1.0)

    with torch.no_grad():
        policy_prediction = policy(noisy, timesteps, **inputs).sample
        policy.disable_adapters()  # the pretrained weights: reference and encoder
        reference_prediction = policy(noisy, timesteps, **inputs).sample

        def features(latent):
            states = official_states(policy, latent, encoder_timesteps, inputs, use_mid)
            return official_features(states, concatenate, normalize)

        target = features(encoded(latents))
        errors = []
        for prediction in (policy_prediction, reference_prediction):
            clean = (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
            error = weight * ((features(encoded(clean)) - target) ** 2).mean(dim=(1, 2, 3))
            if settings.get("add_latent_error"):
                error = error + ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
            errors.append(error)
        policy.enable_adapters()
    (policy_w, policy_l), (ref_w, ref_l) = (error.chunk(2) for error in errors)

    torch.testing.assert_close(scores.policy_chosen.detach(), -0.5 * policy_w, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(scores.ref_rejected, -0.5 * ref_l, atol=1e-7, rtol=1e-4)
    logits = (ref_w - ref_l) - (policy_w - policy_l)
    assert logits.abs().min() > 0  # the policy differs from the reference
    # The DPO logit β·margin (tiny for previous_step: one DDPM step moves x_t little), then the loss itself.
    margin = output.chosen_rewards - output.rejected_rewards
    torch.testing.assert_close(margin, OFFICIAL_BETA * logits, atol=1e-8, rtol=1e-3)
    official = -F.logsigmoid(OFFICIAL_BETA * logits).mean()
    torch.testing.assert_close(output.loss.detach(), official, atol=1e-6, rtol=1e-5)


def test_every_objective_runs_through_the_core(sd_sdxl_dirs):
    """Given per-sample errors L (checked above), each loss type against its formula in the official β."""
    family = load_family(str(sd_sdxl_dirs["sd"]))
    policy = lora_policy(family)
    batch = latent_pairs(family)
    settings = method_settings("ncp", encoded_latent="clean_at_zero")
    with_reference, _ = NoiseConditionedPerception(
        family, ReferenceDenoiser(policy, frozen_copy=False), settings
    ).pair_scores(policy, batch)
    without_reference, _ = NoiseConditionedPerception(family, None, settings).pair_scores(policy, batch)
    policy_w, policy_l = (
        -2 * with_reference.policy_chosen.detach(),
        -2 * with_reference.policy_rejected.detach(),
    )
    ref_w, ref_l = -2 * with_reference.ref_chosen, -2 * with_reference.ref_rejected
    torch.testing.assert_close(-2 * without_reference.policy_chosen.detach(), policy_w)
    logits = (ref_w - ref_l) - (policy_w - policy_l)

    def ours(scores, loss_type, beta=OUR_BETA):
        return compute_loss(scores, LossConfig(type=loss_type, beta=beta)).loss.detach()

    log_odds = [-0.5 * error - torch.log1p(-torch.exp(-0.5 * error)) for error in (policy_w, policy_l)]
    expected = {
        "sigmoid": (ours(with_reference, ["sigmoid"]), -F.logsigmoid(OFFICIAL_BETA * logits).mean()),
        "hinge": (ours(with_reference, ["hinge"]), F.relu(1 - OFFICIAL_BETA * logits).mean()),
        "ipo": (ours(with_reference, ["ipo"]), ((0.5 * logits - 1 / (2 * OUR_BETA)) ** 2).mean()),
        "cpo": (
            ours(without_reference, ["cpo"]),
            -F.logsigmoid(-OFFICIAL_BETA * (policy_w - policy_l)).mean(),
        ),
        # The official SFT is mean L_w; our scores carry the ½.
        "sft": (2 * ours(without_reference, ["sft"]), policy_w.mean()),
        # ORPO = ½·L_w − λ·log σ(log odds_w − log odds_l), odds of p = exp(−½·L) (one unit per sample).
        "orpo": (
            ours(without_reference, ["orpo", "sft"], beta=0.1),
            (0.5 * policy_w - 0.1 * F.logsigmoid(log_odds[0] - log_odds[1])).mean(),
        ),
    }
    for name, (value, formula) in expected.items():
        torch.testing.assert_close(value, formula, atol=1e-6, rtol=1e-4, msg=name)
    assert abs(expected["sigmoid"][1].item() - np.log(2)) > 1e-3


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_the_encoder_is_the_frozen_pretrained_denoiser(sd_sdxl_dirs, trainable):
    family = load_family(str(sd_sdxl_dirs["sdxl"]))
    policy = family.denoiser
    pretrained = UNet2DConditionModel.from_pretrained(sd_sdxl_dirs["sdxl"], subfolder="unet").eval()
    config = DiffusionTrainConfig()
    config.model.trainable = trainable
    make_trainable(policy, config.model)
    method = NoiseConditionedPerception(family, None, method_settings("ncp", encoded_latent="clean_at_zero"))
    with torch.no_grad():  # training moves the policy; the encoder must not follow
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    encoder = method.encoder.model
    assert not any("lora" in name for name, _ in encoder.named_parameters())
    assert not any(parameter.requires_grad for parameter in encoder.parameters())

    batch = latent_pairs(family)
    inputs = family.denoiser_inputs(batch.both_prompt_embeds(), {})
    latents, timesteps = batch.both_latents(), torch.tensor([3, 300, 900] * 2)
    with torch.no_grad():
        expected = official_states(pretrained, latents, timesteps, inputs, use_mid=False)[-1].flatten(1)
    torch.testing.assert_close(
        method.encoder(family, latents, timesteps, inputs), expected, atol=1e-5, rtol=1e-5
    )

    scores, _ = method.pair_scores(policy, batch)
    compute_loss(scores, LossConfig(type=["cpo"], beta=OUR_BETA)).loss.backward()
    assert all(parameter.grad is None for parameter in encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


def test_normalize_states_needs_concatenated_states():
    with pytest.raises(ConfigError, match="method.ncp.normalize_states"):
        from_dict(MethodConfig, {"name": "ncp", "ncp": {"normalize_states": True}})


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_one_ncp_training_step(sd_sdxl_dirs, pairs_file, tmp_path, family_name, trainable):
    config = diffusion_config(
        sd_sdxl_dirs[family_name],
        pairs_file,
        tmp_path,
        model={"trainable": trainable},
        method={"name": "ncp", "ncp": {"encoded_latent": "clean_at_zero", "add_latent_error": True}},
        loss={"type": ["sigmoid"], "beta": OUR_BETA},
    )
    metrics = train(config)
    # policy = reference before the first update (up to fp32 roundoff amplified by β)
    assert abs(metrics["loss"] - np.log(2)) < 1e-3
    assert metrics["grad_norm"] > 0
    assert trained_weights_changed(tmp_path, sd_sdxl_dirs[family_name], trainable)
