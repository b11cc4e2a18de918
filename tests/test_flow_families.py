"""The flow-matching families (SD3, FLUX.1, FLUX.2 [klein], Qwen-Image, SANA) on tiny random pipelines and on the
published transformer configs: sampling against the stock pipelines, training σ against diffusers' training
examples, flow-matching DPO against its formula written out here, the VAE normalisation in every latent path,
training steps and the exported files."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from helpers import diffusion_config, merged, quiet_run
from peft import LoraConfig
from safetensors.torch import load_file
from tiny_pipelines import (
    build_tiny_flux,
    build_tiny_flux2_klein,
    build_tiny_qwen_image,
    build_tiny_sana,
    build_tiny_sd3,
)

from diffalign.config import from_dict
from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import FamilyOptions, load_family
from diffalign.diffusion.families.flux import FluxFamily
from diffalign.diffusion.families.flux2 import Flux2KleinFamily
from diffalign.diffusion.families.qwen_image import ImageFrameVAE, QwenImageFamily
from diffalign.diffusion.families.sana import COMPLEX_HUMAN_INSTRUCTION, SanaFamily, flow_match_scheduler
from diffalign.diffusion.families.sd3 import StableDiffusion3Family
from diffalign.diffusion.methods import LatentPairBatch, pair_noise
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import DiffusionRecipe, train
from diffalign.diffusion.training_data import build_pair_dataset
from diffalign.losses import LossConfig, compute_loss
from diffalign.training import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a blue square"]
FAMILIES = ["sd3", "flux", "flux2", "qwen_image", "sana"]
PIPELINES = {
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "flux2": Flux2KleinPipeline,
    "qwen_image": QwenImagePipeline,
    "sana": SanaPipeline,
}
DENOISERS = {
    "sd3": SD3Transformer2DModel,
    "flux": FluxTransformer2DModel,
    "flux2": Flux2Transformer2DModel,
    "qwen_image": QwenImageTransformer2DModel,
    "sana": SanaTransformer2DModel,
}
# Text tokens per caption: the toy's 8; the tiny Qwen tokenizer spells the chat template byte by byte, so its
# captions keep about 140 tokens after the 34 the pipeline drops; SANA's 32 leave room for padding after a caption;
# FLUX.2's chat template takes about 50 of its 64.
TEXT_LENGTH = {"sd3": 8, "flux": 8, "flux2": 64, "qwen_image": 160, "sana": 32}
# Sample sizes: 8×8 latents (the tiny SD3 and FLUX VAEs downsample by 2; Qwen-Image's video VAE by 8, so its
# 4×4 latents make four packed tokens); SANA's pipeline takes only multiples of 32 px, 16×16 latents here; FLUX.2's
# 16 px make 4×4 tokens of 2×2-patchified latents.
RESOLUTION = {"sd3": 16, "flux": 16, "flux2": 16, "qwen_image": 32, "sana": 32}
CHANNELS = {"flux2": 128, "sana": 32}  # latent channels where not 16
# Training images: helpers' 16 px, or SANA's 32 (its DC-AE's pixels per latent, which its config check asks for).
DATA = {"sana": {"resolution": 32}}
REAL_CONFIGS = Path(__file__).parents[1] / "configs" / "models"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-models")
    return {
        "sd3": build_tiny_sd3(root / "sd3"),
        "sd3_without_t5": build_tiny_sd3(root / "sd3-no-t5", drop_t5=True),
        "flux": build_tiny_flux(root / "flux"),
        "flux2": build_tiny_flux2_klein(root / "flux2"),
        "qwen_image": build_tiny_qwen_image(root / "qwen-image"),
        "sana": build_tiny_sana(root / "sana"),
    }


def options(name: str) -> FamilyOptions:
    return FamilyOptions(sample_resolution=RESOLUTION.get(name, 16), max_text_length=TEXT_LENGTH.get(name, 8))


# The flow families' test runs: LoRA on the attention projections, 16 px samples, the toy's 8 text tokens.
FLOW_MODEL = {
    "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    "sample_resolution": 16,
    "max_text_length": 8,
}


def config_for(model_dir: Path, pairs: Path, output: Path, text_length: int = 8, **sections) -> DiffusionTrainConfig:
    """One LoRA DPO step of a flow family (LoRA alpha 16, β 500)."""
    model = merged(FLOW_MODEL, {"lora": {"alpha": 16.0}, "max_text_length": text_length})
    flow_dpo = {"model": model, "loss": {"beta": 500.0}}
    return diffusion_config(model_dir, pairs, output, **merged(flow_dpo, sections))


def random_lora(denoiser: torch.nn.Module, std: float = 0.05) -> None:
    """A LoRA adapter with random B (the zero init leaves the policy equal to the reference)."""
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=std)


# --- sampling and training σ ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_equals_the_stock_pipeline(model_dirs, name):
    family = load_family(str(model_dirs[name]), options=options(name))
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    ours = family.sample(family.denoiser, PROMPTS, generators, num_inference_steps=4, guidance_scale=4.0)

    pipeline = PIPELINES[name].from_pretrained(model_dirs[name])
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    # Qwen-Image's pipeline guides only with a negative prompt, and calls its scale true_cfg_scale.
    guidance = {"guidance_scale": 4.0}
    if name == "qwen_image":
        guidance = {"true_cfg_scale": 4.0, "negative_prompt": [" "] * 2}
    if name == "sana":  # its aspect-ratio bins would resize a tiny sample
        guidance["use_resolution_binning"] = False
    stock = pipeline(
        prompt=PROMPTS,
        generator=generators,
        num_inference_steps=4,
        height=RESOLUTION[name],
        width=RESOLUTION[name],
        max_sequence_length=TEXT_LENGTH[name],
        output_type="latent",
        **guidance,
    ).images
    size = RESOLUTION[name]
    if name == "flux":  # the pipeline returns packed tokens
        stock = FluxPipeline._unpack_latents(stock, size, size, family.vae_scale_factor)
    if name == "qwen_image":  # packed tokens of a one-frame video
        stock = QwenImagePipeline._unpack_latents(stock, size, size, family.vae_scale_factor).squeeze(2)
    atol = 1e-6
    if name == "flux2":  # the pipeline returns the VAE's latents, unnormalised (one rounding more) and unpatchified
        ours, atol = family.from_latents(ours), 4e-6
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=atol)
    images = family.generate(family.denoiser, PROMPTS[:1], generators[:1], num_inference_steps=2, guidance_scale=4.0)
    assert images.shape == (1, 3, size, size) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", ["sd3", "sana"])
def test_training_sigmas_are_a_logit_normal_draw_from_the_shifted_grid(model_dirs, name):
    """train_dreambooth_lora_sd3.py (and SANA's configs: flow_shift 3, logit-normal): u = sigmoid(N(0, 1)), index
    floor(u·1000) into the descending shifted grid σ_i = 3s/(1 + 2s), s = (1000 − i)/1000."""
    family = load_family(str(model_dirs[name]), options=options(name))
    drawn = family.sample_timesteps(512, torch.device("cpu"), torch.Generator().manual_seed(5))
    u = torch.sigmoid(torch.normal(0.0, 1.0, (512,), generator=torch.Generator().manual_seed(5)))
    s = (1000 - (u * 1000).long()).double() / 1000
    torch.testing.assert_close(drawn.double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "flux2", "qwen_image"])
def test_dynamically_shifted_families_train_on_the_unshifted_grid_uniformly(model_dirs, name):
    """With dynamic shifting the training grid is unshifted (σ = s), and the FLUX, FLUX.2 [klein] and Qwen-Image
    examples' default weighting ("none") draws it uniformly."""
    family = load_family(str(model_dirs[name]), options=options(name))
    drawn = family.sample_timesteps(512, torch.device("cpu"), torch.Generator().manual_seed(5))
    u = torch.rand(512, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn.double(), (1000 - (u * 1000).long()).double() / 1000, rtol=1e-6, atol=1e-6)


# --- flow-matching DPO -------------------------------------------------------------------------------------------------


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2×2 patch tokens ``[B, h/2·w/2, 4C]``, channel-major within a patch."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def velocity_by_hand(name: str, transformer, noisy, sigmas, embeds) -> torch.Tensor:
    if name == "sd3":
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
        ).sample
    if name == "sana":
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_attention_mask=embeds["prompt_attention_mask"],
        ).sample
    height, width = noisy.shape[-2:]
    if name == "flux2":  # every latent position a token with ids (0, row, column, 0); text ids (0, 0, 0, index)
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        zeros = torch.zeros_like(rows)
        image_ids = torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(1, -1, 4).expand(len(noisy), -1, -1)
        length = embeds["prompt_embeds"].shape[1]
        text_ids = torch.zeros(len(noisy), length, 4, dtype=torch.long)
        text_ids[..., 3] = torch.arange(length)
        output = transformer(
            hidden_states=noisy.permute(0, 2, 3, 1).reshape(len(noisy), height * width, -1),
            timestep=sigmas,
            encoder_hidden_states=embeds["prompt_embeds"],
            img_ids=image_ids,
            txt_ids=text_ids,
        ).sample
        return output.reshape(len(noisy), height, width, -1).permute(0, 3, 1, 2)
    if name == "qwen_image":
        output = transformer(
            hidden_states=pack(noisy),
            timestep=sigmas,
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_hidden_states_mask=embeds["prompt_embeds_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * noisy.shape[0],
        ).sample
        return unpack(output, height, width)
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()
    output = transformer(
        hidden_states=pack(noisy),
        timestep=sigmas,
        guidance=torch.full((noisy.shape[0],), 3.5),
        encoder_hidden_states=embeds["prompt_embeds"],
        pooled_projections=embeds["pooled_prompt_embeds"],
        txt_ids=torch.zeros(embeds["prompt_embeds"].shape[1], 3),
        img_ids=image_ids,
    ).sample
    return unpack(output, height, width)


@pytest.mark.parametrize("name", FAMILIES)
def test_flow_dpo_loss_equals_the_formula(model_dirs, name):
    """L = −log σ(−½β[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]), e = mean (v̂ − (ε − x0))², x_σ = (1 − σ)x0 + σε,
    one ε and σ per pair (flow_grpo train_sd3_dpo.py, Flow-Factory's DPO trainer)."""
    family = load_family(str(model_dirs[name]), options=options(name))
    policy = family.denoiser
    torch.manual_seed(0)
    random_lora(policy, std=0.5 if name == "flux2" else 0.05)  # FLUX.2's tiny blocks move little at 0.05
    generator = torch.Generator().manual_seed(0)
    shape = (2, CHANNELS.get(name, 16), 8, 8)
    chosen, rejected = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    embeds = family.encode_prompts(PROMPTS)
    batch = LatentPairBatch(chosen, rejected, embeds, noise_seeds=[11, 12])
    beta = 500.0
    scores, _ = DiffusionDPO(family, ReferenceDenoiser(policy, frozen_copy=False)).pair_scores(policy, batch)
    loss = compute_loss(scores, LossConfig(type=["sigmoid"], beta=beta)).loss

    noise, sigmas = pair_noise(family, batch)  # the pair's own draws, shared by both members
    both_embeds = {key: torch.cat([value, value]) for key, value in embeds.items()}

    def errors(model) -> torch.Tensor:
        latents = torch.cat([chosen, rejected])
        sigma = sigmas.repeat(2).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * torch.cat([noise, noise])
        velocity = velocity_by_hand(name, model, noisy, sigmas.repeat(2), both_embeds)
        return (velocity - (torch.cat([noise, noise]) - latents)).pow(2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        policy_errors = errors(policy)
        policy.disable_adapters()
        reference_errors = errors(policy)
        policy.enable_adapters()
    inside = -0.5 * beta * ((policy_errors[:2] - reference_errors[:2]) - (policy_errors[2:] - reference_errors[2:]))
    expected = -F.logsigmoid(inside).mean()
    assert abs(expected.item() - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


# --- latents -----------------------------------------------------------------------------------------------------------


def test_the_trainer_encodes_pixels_with_the_vae_scale_and_shift(model_dirs, pairs_file, tmp_path):
    """Latents on the fly are (posterior sample − shift)·scale, as the cache draws them (test_diffusion_cache)."""
    config = config_for(model_dirs["sd3"], pairs_file, tmp_path)
    recipe = DiffusionRecipe(config, make_accelerator(config.run))
    items = [recipe.train_dataset[index] for index in range(2)]
    batch = recipe.collate(items)
    batch["sample_ids"] = [0, 1]
    latents = recipe.latent_batch(batch)
    vae = recipe.family.vae
    with torch.no_grad():
        posterior = vae.encode(torch.cat([batch["chosen_pixels"], batch["rejected_pixels"]])).latent_dist
    seeds = recipe.noise_seeds(batch)
    draws = [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(2 * s + 1)) for s in seeds]
    chosen = (posterior.mean[:2] + posterior.std[:2] * torch.stack(draws) - 0.0609) * 1.5305
    torch.testing.assert_close(latents.chosen_latents, chosen, rtol=1e-5, atol=1e-5)
    images = recipe.family.decode(latents.chosen_latents)
    decoded = vae.decode(latents.chosen_latents / 1.5305 + 0.0609).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1))


BOUNDS = [("StableDiffusion3Pipeline", 512), ("FluxPipeline", 512), ("QwenImagePipeline", 1024)]


@pytest.mark.parametrize("pipeline, limit", BOUNDS)
def test_a_text_length_past_the_pipelines_bound_is_refused_when_the_config_loads(pairs_file, tmp_path, pipeline, limit):
    """The stock pipelines refuse a longer max_sequence_length; training at one would give a model they cannot
    sample as trained."""
    from diffalign.config import ConfigError

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    assert config_for(tmp_path, pairs_file, tmp_path, text_length=limit).model.max_text_length == limit
    refusal = rf"model.max_text_length: {limit + 1} tokens is more than .* set at most {limit}"
    with pytest.raises(ConfigError, match=refusal):
        config_for(tmp_path, pairs_file, tmp_path, text_length=limit + 1)


def test_a_changed_text_length_encodes_the_captions_again(model_dirs, pairs_file, tmp_path):
    """The prompt cache's key covers ``model.max_text_length``: FLUX pads T5 to it, so captions cached at 8
    tokens must not serve a run at 12 (the reference cache's key takes the same id)."""
    data = config_for(model_dirs["flux"], pairs_file, tmp_path, data={"cache_dir": str(tmp_path / "cache")}).data
    assert load_family(str(model_dirs["flux"])).prompt_encoding_id() == "FluxFamily"  # unset: keys as before
    encoded = []
    for length in (8, 12, 8):
        family = load_family(str(model_dirs["flux"]), options=FamilyOptions(max_text_length=length))
        dataset, _, stats = build_pair_dataset(data, family=family, seed=0)
        assert dataset[0]["prompt_embeds"]["prompt_embeds"].shape[0] == length
        encoded.append(stats["cache_captions_encoded"])
    assert encoded[0] == encoded[1] > 0 and encoded[2] == 0  # 8, then 12 encoded; 8 again read from the cache


def test_qwen_image_latents_are_its_training_examples_per_channel_normalisation(model_dirs, pairs_file, tmp_path):
    """train_dreambooth_lora_qwen_image.py: z = (x − latents_mean)·(1/latents_std) of the VAE's one-frame encode;
    decoding is the pipeline's: x = z·std + mean through the VAE, frame 0."""
    config = config_for(model_dirs["qwen_image"], pairs_file, tmp_path, TEXT_LENGTH["qwen_image"])
    recipe = DiffusionRecipe(config, make_accelerator(config.run))
    batch = recipe.collate([recipe.train_dataset[index] for index in range(2)])
    batch["sample_ids"] = [0, 1]
    latents = recipe.latent_batch(batch)
    stock_vae = AutoencoderKLQwenImage.from_pretrained(model_dirs["qwen_image"], subfolder="vae")
    with torch.no_grad():
        posterior = stock_vae.encode(batch["chosen_pixels"].unsqueeze(2)).latent_dist  # [B, 16, 1, h, w]
    draws = [
        torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(2 * seed + 1))
        for seed in recipe.noise_seeds(batch)
    ]
    mean = torch.tensor(stock_vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(stock_vae.config.latents_std).view(1, 16, 1, 1, 1)
    expected = (posterior.mean + posterior.std * torch.stack(draws) - mean) * (1 / std)
    torch.testing.assert_close(latents.chosen_latents, expected.squeeze(2), rtol=1e-5, atol=1e-5)
    # The latent cache normalises one sample ([16, h, w]) at a time: the same maps as on a batch.
    normalization, vae_latents = recipe.family.latent_normalization, torch.randn(2, 16, 4, 4)
    one_at_a_time = torch.stack([normalization.to_latents(sample) for sample in vae_latents])
    torch.testing.assert_close(one_at_a_time, normalization.to_latents(vae_latents))
    torch.testing.assert_close(normalization.from_latents(one_at_a_time), vae_latents, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        decoded = stock_vae.decode(latents.chosen_latents.unsqueeze(2) * std + mean).sample[:, :, 0]
        images = recipe.family.decode(latents.chosen_latents)
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_a_qwen_image_caption_embeds_alike_in_any_batch_and_as_the_pipeline_embeds_it(model_dirs):
    """Padded to max_text_length and cut to the batch's longest caption: the pipeline's embeddings and mask."""
    family = load_family(str(model_dirs["qwen_image"]), options=options("qwen_image"))
    prompts = ["a red circle", "a blue square on white"]
    together = family.encode_prompts(prompts)
    alone = family.encode_prompts(prompts[:1])
    torch.testing.assert_close(alone["prompt_embeds"][0], together["prompt_embeds"][0], rtol=1e-5, atol=1e-6)
    inputs = family.denoiser_inputs(together, {})
    pipeline = QwenImagePipeline.from_pretrained(model_dirs["qwen_image"])
    with torch.no_grad():
        stock_embeds, stock_mask = pipeline.encode_prompt(prompts, device="cpu", max_sequence_length=160)
    assert stock_mask is not None and stock_mask[0].sum() < stock_mask[1].sum()  # the batch was padded
    torch.testing.assert_close(inputs["encoder_hidden_states"], stock_embeds, rtol=1e-5, atol=1e-6)
    assert torch.equal(inputs["encoder_hidden_states_mask"], stock_mask)


def test_a_sana_caption_embeds_as_the_pipeline_embeds_it_after_its_instruction(model_dirs):
    """The pipeline's states of the caption after the complex human instruction, zero where the mask is (the
    transformer masks them), alike alone and in a batch, cut to the batch's longest caption."""
    family = load_family(str(model_dirs["sana"]), options=options("sana"))
    prompts = ["a red circle", "a blue square"]
    together = family.encode_prompts(prompts)
    alone = family.encode_prompts(prompts[:1])
    torch.testing.assert_close(alone["prompt_embeds"][0], together["prompt_embeds"][0], rtol=1e-5, atol=1e-6)
    pipeline = SanaPipeline.from_pretrained(model_dirs["sana"])
    with torch.no_grad():
        stock_embeds, stock_mask, _, _ = pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, device="cpu", max_sequence_length=TEXT_LENGTH["sana"],
            complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION,
        )
    assert 0 < stock_mask[0].sum() < stock_mask[1].sum() < TEXT_LENGTH["sana"]  # padded, the longer one too
    assert torch.equal(together["prompt_attention_mask"], stock_mask)
    kept = stock_mask.bool()
    torch.testing.assert_close(together["prompt_embeds"][kept], stock_embeds[kept], rtol=1e-5, atol=1e-6)
    assert together["prompt_embeds"][~kept].abs().max() == 0
    inputs = family.denoiser_inputs(together, {})
    assert inputs["encoder_hidden_states"].shape[1] == inputs["encoder_attention_mask"].shape[1] == stock_mask[1].sum()


def test_sana_latents_are_the_dc_ae_encoding_times_its_scaling_factor(model_dirs, pairs_file, tmp_path):
    """train_dreambooth_lora_sana.py: z = vae.encode(x).latent · 0.41407; the DC-AE has no posterior, so every
    draw is the encoding, read from the latent cache or encoded on the fly; decoding is vae.decode(z / 0.41407)."""

    def first_latents(data: dict):
        config = config_for(model_dirs["sana"], pairs_file, tmp_path, TEXT_LENGTH["sana"], data=DATA["sana"] | data)
        recipe = DiffusionRecipe(config, make_accelerator(config.run))
        batch = recipe.collate([recipe.train_dataset[index] for index in range(2)])
        batch["sample_ids"] = [0, 1]
        return recipe, batch, recipe.latent_batch(batch)

    recipe, batch, latents = first_latents({})
    _, _, cached = first_latents({"cache_dir": str(tmp_path / "cache")})
    torch.testing.assert_close(cached.chosen_latents, latents.chosen_latents, rtol=1e-5, atol=1e-6)
    stock_vae = AutoencoderDC.from_pretrained(model_dirs["sana"], subfolder="vae")
    with torch.no_grad():
        expected = stock_vae.encode(batch["chosen_pixels"]).latent * 0.41407
        decoded = stock_vae.decode(latents.chosen_latents / 0.41407).sample
        images = recipe.family.decode(latents.chosen_latents)
    assert expected.shape[1:] == (32, 16, 16)
    torch.testing.assert_close(latents.chosen_latents, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_flux2_latents_are_its_training_examples_batch_normalised_patches(model_dirs, pairs_file, tmp_path):
    """train_dreambooth_lora_flux2_klein.py: 2×2 patches of the VAE latents on channels, then
    (x − bn.running_mean)/√(bn.running_var + eps); one sample at a time (as the cache maps) alike; decoding inverts
    it."""
    config = config_for(model_dirs["flux2"], pairs_file, tmp_path, TEXT_LENGTH["flux2"])
    recipe = DiffusionRecipe(config, make_accelerator(config.run))
    batch = recipe.collate([recipe.train_dataset[index] for index in range(2)])
    batch["sample_ids"] = [0, 1]
    latents = recipe.latent_batch(batch)
    stock_vae = AutoencoderKLFlux2.from_pretrained(model_dirs["flux2"], subfolder="vae")
    with torch.no_grad():
        posterior = stock_vae.encode(batch["chosen_pixels"]).latent_dist
    draws = [
        torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(2 * seed + 1))
        for seed in recipe.noise_seeds(batch)
    ]
    sample = posterior.mean + posterior.std * torch.stack(draws)  # [B, 32, h, w]
    b, c, h, w = sample.shape
    patches = sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
    mean = stock_vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(stock_vae.bn.running_var.view(1, -1, 1, 1) + stock_vae.config.batch_norm_eps)
    assert std.std() > 0.1  # the tiny VAE's statistics differ per channel
    torch.testing.assert_close(latents.chosen_latents, (patches - mean) / std, rtol=1e-5, atol=1e-5)
    normalization = recipe.family.latent_normalization
    torch.testing.assert_close(normalization.to_latents(sample[0]), latents.chosen_latents[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalization.from_latents(latents.chosen_latents), sample, rtol=1e-5, atol=1e-5)


def test_a_flux2_caption_embeds_as_three_qwen3_layers_of_its_chat_template(model_dirs):
    """The states of Qwen3's layers 9, 18 and 27 on the caption's chat template padded to max_text_length, joined on
    channels; alike alone and in a batch."""
    family = load_family(str(model_dirs["flux2"]), options=options("flux2"))
    prompts = ["a red circle", "a blue square on white"]
    together = family.encode_prompts(prompts)["prompt_embeds"]
    alone = family.encode_prompts(prompts[:1])["prompt_embeds"]
    torch.testing.assert_close(alone[0], together[0], rtol=1e-5, atol=1e-6)
    tokenizer = family.tokenizer
    texts = [
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" for prompt in prompts
    ]
    length = TEXT_LENGTH["flux2"]
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert tokens.attention_mask.sum(1).max() < length  # every caption whole, then padding
    with torch.no_grad():
        states = family.text_encoder(**tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(together, torch.cat([states[9], states[18], states[27]], dim=-1), rtol=1e-5, atol=1e-6)


def test_sd3_without_t5_conditions_on_zeros_in_place_of_its_states(model_dirs):
    family = load_family(
        str(model_dirs["sd3"]), options=FamilyOptions(max_text_length=8, drop_text_encoders=("text_encoder_3",))
    )
    assert family.text_encoder_3 is None and "text_encoder_3" not in family.frozen_modules()
    embeds = family.encode_prompts(PROMPTS)["prompt_embeds"]
    clip_tokens = family.tokenizer.model_max_length
    assert embeds.shape == (2, clip_tokens + 8, 32)
    assert embeds[:, clip_tokens:].abs().max() == 0 and embeds[:, :clip_tokens].abs().max() > 0


# --- training steps and outputs ------------------------------------------------------------------------------------------


def trained_denoiser(output: Path, base: Path, denoiser_class) -> torch.nn.Module:
    """The denoiser as it was in training: base weights plus the checkpoint's trainable tensors."""
    denoiser = denoiser_class.from_pretrained(base, subfolder="transformer")
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    snapshot = load_file(sorted((output / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    assert not denoiser.load_state_dict(snapshot, strict=False).unexpected_keys
    return denoiser


@pytest.mark.parametrize("name", FAMILIES)
def test_a_lora_step_trains_and_the_file_loads_at_the_trained_strength(model_dirs, pairs_file, tmp_path, name):
    config = config_for(
        model_dirs[name], pairs_file, tmp_path, TEXT_LENGTH[name], optim={"lr": 0.05}, data=DATA.get(name, {})
    )
    metrics = train(config)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-3) and metrics["grad_norm"] > 0
    trained = trained_denoiser(tmp_path, model_dirs[name], DENOISERS[name])
    pipeline = PIPELINES[name].from_pretrained(model_dirs[name])
    pipeline.load_lora_weights(tmp_path / "final")

    family = load_family(str(model_dirs[name]), options=options(name))
    embeds = family.encode_prompts(PROMPTS)
    latents = torch.randn(2, CHANNELS.get(name, 16), 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        base = velocity_by_hand(name, family.denoiser, latents, sigmas, embeds)
        expected = velocity_by_hand(name, trained, latents, sigmas, embeds)
        loaded = velocity_by_hand(name, pipeline.transformer, latents, sigmas, embeds)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_full_step_writes_a_transformer_that_loads_with_from_pretrained(model_dirs, pairs_file, tmp_path, name):
    full = {"model": {"trainable": "full"}, "data": DATA.get(name, {})}
    metrics = train(config_for(model_dirs[name], pairs_file, tmp_path, TEXT_LENGTH[name], **full))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    denoiser_class = DENOISERS[name]
    loaded = denoiser_class.from_pretrained(tmp_path / "final" / "transformer")
    saved = loaded.state_dict()
    snapshot = load_file(sorted((tmp_path / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    assert set(snapshot) == {name for name, _ in loaded.named_parameters()}  # every parameter, no buffer
    assert all(torch.equal(saved[key], value) for key, value in snapshot.items())
    base = denoiser_class.from_pretrained(model_dirs[name], subfolder="transformer").state_dict()
    assert any(not torch.equal(base[key], value) for key, value in snapshot.items())


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("seppo", {"num_inference_steps": 2, "generation_batch_size": 2}),
        ("dragon", {"num_inference_steps": 2, "reward": "test_mean_red", "prompts": PROMPTS}),
    ],
)
def test_online_methods_sample_through_the_flow_family(model_dirs, pairs_file, tmp_path, method, settings):
    config = config_for(model_dirs["sd3"], pairs_file, tmp_path, method={"name": method, method: settings})
    metrics = train(config)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.parametrize("method", ["inpo", "ncp"])
def test_ddpm_methods_are_refused_on_flow_families(model_dirs, pairs_file, tmp_path, method):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=f"'{method}' needs a discrete DDPM noise schedule"):
        config_for(model_dirs["flux"], pairs_file, tmp_path, method={"name": method})


@pytest.mark.parametrize(
    ("config_name", "name"),
    [
        ("sd35_dpo_lora", "sd3"),
        ("flux_dpo_lora", "flux"),
        ("qwen_image_dpo_lora", "qwen_image"),
        ("sana_dpo_lora", "sana"),
        ("flux2_klein_dpo_lora", "flux2"),
        ("sd35_grpo", "sd3"),
    ],
)
def test_the_shipped_flow_configs_train_on_their_familys_tiny_model(model_dirs, pairs_file, tmp_path, config_name, name):
    """Each real-model flow config, with its model, data and reward swapped for tiny local ones and its run cut to
    one step (plain AdamW: bitsandbytes is optional), trains as written: its LoRA targets exist, gradient
    checkpointing runs, the method and its sampling work on the family."""
    raw = yaml.safe_load((REAL_CONFIGS.parent / f"{config_name}.yaml").read_text())
    model = {"pretrained": str(model_dirs[name]), "max_text_length": TEXT_LENGTH[name]}
    small = {
        "model": model | {"sample_resolution": RESOLUTION[name]},
        "optim": {"name": "adamw"},
        "run": quiet_run(tmp_path, max_steps=1, batch_size=2, gradient_accumulation_steps=1),
        "eval": {"prompts": PROMPTS[:1], "num_inference_steps": 2, "samples_per_prompt": 1},
    }
    if "data" in raw:
        small["data"] = {"source": str(pairs_file), "resolution": 32, "cache_dir": str(tmp_path / "cache")}
    else:  # Flow-GRPO: the test reward in place of PickScore, groups of 2 from two prompts
        grpo = {"prompts_file": None, "prompts": PROMPTS, "group_size": 2, "num_inference_steps": 2}
        small["method"] = {"grpo": grpo | {"generation_batch_size": 4, "rewards": [{"name": "test_mean_red"}]}}
        small["eval"] |= {"prompts_file": None, "max_prompts": None, "reward": None}
    raw = merged(raw, small)
    config = from_dict(DiffusionTrainConfig, raw)
    assert config.run.gradient_checkpointing
    metrics = train(config)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()


# --- the published transformer configs at full width ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd35-medium", "flux1-dev", "flux2-klein-base-4b", "qwen-image", "sana-1600m-1024"])
def test_the_published_transformer_at_full_width_runs_a_lora_dpo_step(model):
    """One transformer block at the published width (SD3.5 Medium: 1536, FLUX.1-dev, FLUX.2 [klein] 4B and
    Qwen-Image: 3072, SANA 1600M: 2240) with its scheduler and VAE configs; conditioning of the published widths,
    random."""
    published = REAL_CONFIGS / model
    config = json.loads((published / "transformer.json").read_text())
    vae_config = json.loads((published / "vae.json").read_text())
    if model == "sd35-medium":
        config.update(num_layers=1, dual_attention_layers=(0,))
        family_class, denoiser_class, vae_class = StableDiffusion3Family, SD3Transformer2DModel, AutoencoderKL
        embeds = {"prompt_embeds": torch.randn(1, 12, 4096), "pooled_prompt_embeds": torch.randn(1, 2048)}
    elif model == "flux1-dev":
        config.update(num_layers=1, num_single_layers=1)
        family_class, denoiser_class, vae_class = FluxFamily, FluxTransformer2DModel, AutoencoderKL
        embeds = {"prompt_embeds": torch.randn(1, 12, 4096), "pooled_prompt_embeds": torch.randn(1, 768)}
    elif model == "flux2-klein-base-4b":
        config.update(num_layers=1, num_single_layers=1)
        family_class, denoiser_class, vae_class = Flux2KleinFamily, Flux2Transformer2DModel, AutoencoderKLFlux2
        text_config = json.loads((published / "text_encoder.json").read_text())
        assert 3 * text_config["hidden_size"] == config["joint_attention_dim"] == 7680  # three Qwen3-4B layers
        embeds = {"prompt_embeds": torch.randn(1, 12, 7680)}
    elif model == "sana-1600m-1024":
        config.update(num_layers=1)
        family_class, denoiser_class, vae_class = SanaFamily, SanaTransformer2DModel, AutoencoderDC
        text_config = json.loads((published / "text_encoder.json").read_text())
        assert text_config["hidden_size"] == config["caption_channels"] == 2304  # Gemma-2-2B's states
        mask = torch.ones(1, 12, dtype=torch.long)
        embeds = {"prompt_embeds": torch.randn(1, 12, 2304), "prompt_attention_mask": mask}
    else:
        config.update(num_layers=1)
        family_class, denoiser_class, vae_class = QwenImageFamily, QwenImageTransformer2DModel, ImageFrameVAE
        # The width of Qwen2.5-VL-7B's last hidden states, as the published text encoder config states it.
        text_config = json.loads((published / "text_encoder.json").read_text())["text_config"]
        assert text_config["hidden_size"] == config["joint_attention_dim"] == 3584
        embeds = {"prompt_embeds": torch.randn(1, 12, 3584), "prompt_embeds_mask": torch.ones(1, 12, dtype=torch.long)}
    torch.manual_seed(0)
    denoiser = denoiser_class.from_config(config)
    scheduler = flow_match_scheduler(json.loads((published / "scheduler.json").read_text()))
    vae = vae_class.from_config(vae_config)
    family = family_class.from_modules(model, denoiser=denoiser, noise_scheduler=scheduler, vae=vae)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    latents = torch.randn(2, config["in_channels"] // (4 if model in ("flux1-dev", "qwen-image") else 1), 8, 8)
    batch = LatentPairBatch(latents[:1], latents[1:], embeds, noise_seeds=[3])
    method = DiffusionDPO(family, ReferenceDenoiser(denoiser, frozen_copy=False))
    loss = compute_loss(method.pair_scores(denoiser, batch)[0], LossConfig(type=["sigmoid"], beta=500.0)).loss
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
    gradients = [p.grad for name, p in denoiser.named_parameters() if "lora" in name]
    assert gradients and all(g is not None for g in gradients) and any(g.abs().sum() > 0 for g in gradients)
    normalization = copy.deepcopy(family.latent_normalization)
    if model == "qwen-image":
        assert family.vae_scale_factor == 8
        assert normalization.mean == tuple(vae_config["latents_mean"]) and normalization.std[-1] == 1.916
    elif model == "flux2-klein-base-4b":  # the VAE's batch norm over its 2×2-patchified 128 channels
        assert family.vae_scale_factor == 8 and len(normalization.mean) == len(normalization.std) == 128
    elif model == "sana-1600m-1024":
        # The published DPM-Solver config's flow_shift is the Euler scheduler's shift; no VAE shift.
        assert family.vae_scale_factor == 32 and scheduler.config.shift == 3.0
        assert (normalization.scale, normalization.shift) == (0.41407, 0.0)
    else:
        assert normalization.shift == vae_config["shift_factor"] != 0


# --- SDE sampling for policy-gradient methods --------------------------------------------------------------------------


def test_the_sde_step_is_flow_grpos_gaussian():
    """μ = x(1 + σ_t²Δ/(2σ)) + v(1 + σ_t²(1−σ)/(2σ))Δ, s = σ_t√(−Δ), σ_t = a√(σ/(1−σ)); log-prob = the mean over
    elements of the Gaussian log-density (torch.distributions here)."""
    from diffalign.diffusion.families.flow import gaussian_log_prob, sde_step_distribution

    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    sigma, next_sigma, level = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.8, 0.4, 0.1]), 0.7
    mean, std = sde_step_distribution(x, v, sigma, next_sigma, level, torch.tensor([0.8]))
    for i in range(3):
        s, delta = sigma[i].item(), (next_sigma[i] - sigma[i]).item()
        std_t = level * math.sqrt(s / (1 - (0.8 if s == 1 else s)))
        expected_mean = x[i] * (1 + std_t**2 * delta / (2 * s)) + v[i] * (1 + std_t**2 * (1 - s) / (2 * s)) * delta
        torch.testing.assert_close(mean[i], expected_mean)
        assert std[i].flatten()[0].item() == pytest.approx(std_t * math.sqrt(-delta), rel=1e-6)
    sample = mean + std * torch.randn(3, 4, 2, 2, generator=generator)
    density = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), density)


@pytest.mark.parametrize("name", FAMILIES)
def test_trajectory_log_probs_are_recomputed_exactly_with_unchanged_weights(model_dirs, name):
    """The on-policy check: with no update between sampling and training the ratio is exactly 1."""
    family = load_family(str(model_dirs[name]), options=options(name))
    random_lora(family.denoiser)
    sde_steps = torch.tensor([True, False, True, True])
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    trajectory = family.sample_trajectory(
        family.denoiser, PROMPTS, generators, num_inference_steps=4, guidance_scale=4.0, noise_level=0.7,
        sde_steps=sde_steps,
    )
    side = RESOLUTION[name] // family.vae_scale_factor // (2 if name == "flux2" else 1)  # FLUX.2's 2×2 patches
    assert trajectory.latents.shape == (2, 5, CHANNELS.get(name, 16), side, side)
    assert (trajectory.log_probs[:, ~sde_steps] == 0).all() and (trajectory.log_probs[:, sde_steps] != 0).all()
    inputs, guided = family.sampling_inputs(PROMPTS, 4.0)
    sigmas = trajectory.sigmas
    for step in sde_steps.nonzero().flatten().tolist():
        log_prob = family.transition_log_prob(
            family.denoiser,
            trajectory.latents[:, step],
            trajectory.latents[:, step + 1],
            sigmas[step].expand(2),
            sigmas[step + 1].expand(2),
            sigmas[1].expand(1),
            inputs,
            guided,
            4.0,
            0.7,
        ).log_prob
        assert torch.exp(log_prob - trajectory.log_probs[:, step]).sub(1).abs().max() < 1e-5
    # Without stochastic steps the chain is the ODE sampler's.
    ode = family.sample_trajectory(
        family.denoiser, PROMPTS, [torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=4,
        guidance_scale=4.0,
    )
    sampled = family.sample(
        family.denoiser, PROMPTS, [torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=4,
        guidance_scale=4.0,
    )
    assert torch.equal(ode.samples, sampled) and not torch.equal(trajectory.samples, sampled)
