"""Diffusion-DPO on tiny SD1.5-like and SDXL-like models: parity with the official loss, references, real UNet."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.families.stable_diffusion import StableDiffusionFamily
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.models import make_trainable
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import LossConfig, compute_loss

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def random_pair_batch(family, batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 4, 8, 8)
    prompts = ["a red circle", "a large blue square", "a small green circle"][:batch_size]
    return LatentPairBatch(
        chosen_latents=torch.randn(shape, generator=generator),
        rejected_latents=torch.randn(shape, generator=generator),
        prompt_embeds=family.encode_prompts(prompts),
    )


def lora_config(**model):
    config = DiffusionTrainConfig().model
    for key, value in model.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_sdxl])
def test_dpo_loss_equals_the_official_formula(builder, tmp_path):
    """−log σ(−½β[(Lθw − Lrw) − (Lθl − Lrl)]) with β=5000, shared ε and t, written out here independently."""
    family = load_family(str(builder(tmp_path / "model")))
    policy = family.denoiser
    make_trainable(policy, lora_config())
    with torch.no_grad():  # move the policy away from the reference so the loss is not log 2
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    batch = random_pair_batch(family)
    method = DiffusionDPO(family, ReferenceDenoiser(policy, frozen_copy=False))

    torch.manual_seed(7)
    scores, metrics = method.pair_scores(policy, batch)
    loss = compute_loss(scores, LossConfig(type=["sigmoid"], beta=5000.0)).loss

    torch.manual_seed(7)
    noise = torch.randn_like(batch.chosen_latents)
    timesteps = torch.randint(0, 1000, (3,))
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    pair_embeds = {name: torch.cat([embeds, embeds]) for name, embeds in batch.prompt_embeds.items()}
    inputs = family.denoiser_inputs(pair_embeds, {})

    # As the official script, winners and losers in one forward ([w; l], the same ε and t for both): separate
    # forwards may take other CPU kernels, whose rounding β = 5000 magnifies to 3e-4 in the loss.
    def errors(model):
        latents = torch.cat([batch.chosen_latents, batch.rejected_latents])
        pair_noise, pair_alphas = noise.repeat(2, 1, 1, 1), alphas.repeat(2, 1, 1, 1)
        noisy = pair_alphas.sqrt() * latents + (1 - pair_alphas).sqrt() * pair_noise
        prediction = model(noisy, timesteps.repeat(2), **inputs).sample
        return ((prediction - pair_noise) ** 2).mean(dim=(1, 2, 3)).chunk(2)

    with torch.no_grad():
        model_w, model_l = errors(policy)
        policy.disable_adapters()
        ref_w, ref_l = errors(policy)
        policy.enable_adapters()
    inside = -0.5 * 5000 * ((model_w - model_l) - (ref_w - ref_l))
    official = -F.logsigmoid(inside).mean()
    assert abs(official.item() - F.logsigmoid(torch.zeros(())).neg().item()) > 1e-3  # a non-trivial case
    torch.testing.assert_close(loss.detach(), official, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["mse/ref_chosen"], ref_w.mean(), atol=1e-6, rtol=1e-5)


def test_frozen_copy_reference_matches_the_pretrained_weights_and_gets_no_gradient(sd_dir):
    family = load_family(str(sd_dir))
    policy = family.denoiser
    make_trainable(policy, lora_config(trainable="full"))
    reference = ReferenceDenoiser(policy, frozen_copy=True)
    batch = random_pair_batch(family)
    method = DiffusionDPO(family, reference)
    torch.manual_seed(1)
    scores, _ = method.pair_scores(policy, batch)
    # Before any update policy and reference agree, so both log-ratios are zero and DPO starts at log 2.
    torch.testing.assert_close(scores.policy_chosen, scores.ref_chosen)
    output = compute_loss(scores, LossConfig(beta=5000.0))
    torch.testing.assert_close(output.loss, torch.log(torch.tensor(2.0)))
    output.loss.backward()
    assert all(p.grad is None for p in reference.copy.parameters())
    assert not any(p.requires_grad for p in reference.copy.parameters())


def test_v_prediction_uses_the_velocity_target(tmp_path):
    family = load_family(str(build_tiny_sd(tmp_path / "v", prediction_type="v_prediction")))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(family.target(latents, noise, timesteps), expected)


def test_sdxl_time_ids_follow_original_size_crop_and_target(sdxl_dir):
    family = load_family(str(sdxl_dir))
    batch = {
        "original_size": torch.tensor([[40, 30], [16, 16]]),
        "crop_top_left": torch.tensor([[4, 0], [0, 0]]),
    }
    time_ids = family.time_ids(batch, 2, torch.device("cpu"), torch.float32)
    # Native size = UNet sample size (8) × VAE downsampling (2).
    assert time_ids.tolist() == [[40, 30, 4, 0, 16, 16], [16, 16, 0, 0, 16, 16]]


def test_the_real_sd15_unet_architecture_runs_a_lora_dpo_step():
    """The published SD1.5 UNet config with random weights, on 8×8 latents: nothing depends on toy sizes."""
    config = json.loads((MODEL_CONFIGS / "sd15" / "unet.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    make_trainable(unet, lora_config())

    # The SD1.5 family's maths with its published scheduler, without loading a 4 GB pipeline from disk.
    scheduler_config = json.loads((MODEL_CONFIGS / "sd15" / "scheduler.json").read_text())
    family = StableDiffusionFamily.from_modules(
        denoiser=unet, noise_scheduler=DDPMScheduler.from_config(scheduler_config)
    )
    batch = LatentPairBatch(
        chosen_latents=torch.randn(1, 4, 8, 8),
        rejected_latents=torch.randn(1, 4, 8, 8),
        prompt_embeds={"prompt_embeds": torch.randn(1, 77, 768)},
    )
    method = DiffusionDPO(family, ReferenceDenoiser(unet, frozen_copy=False))
    scores, _ = method.pair_scores(unet, batch)
    loss = compute_loss(scores, LossConfig(beta=5000.0)).loss
    loss.backward()
    lora_grads = [p.grad for n, p in unet.named_parameters() if "lora" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert torch.isfinite(loss) and abs(loss.item() - 0.6931) < 1e-3
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
