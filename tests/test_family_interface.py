"""The method registry and the family interface: config choices from registrations, capability checks before any
model loads, training timesteps and their weights, latent normalisation, light imports."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_audio_families import build_stable_audio
from tiny_pipelines import build_tiny_sd

from diffalign.config import ConfigError, from_dict
from diffalign.diffusion.config import DiffusionTrainConfig, MethodConfig
from diffalign.diffusion.families import LatentNormalization, load_family
from diffalign.diffusion.methods import METHODS, DiffusionMethod, register_method
from diffalign.diffusion.timesteps import TimestepSettings


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "sd": build_tiny_sd(root / "sd"),
        "sd_v": build_tiny_sd(root / "sd_v", prediction_type="v_prediction"),
        "stable_audio": build_stable_audio(root / "stable_audio"),
    }


# --- the method registry ---------------------------------------------------------------------------------------------


def test_method_choices_and_sections_come_from_the_registry():
    fields = {field.name: field for field in dataclasses.fields(MethodConfig)}
    with_settings = {name for name, method in METHODS.items() if method.settings_class is not None}
    assert set(fields) == {"name"} | with_settings
    assert {"dpo", "inpo", "ncp", "seppo", "dragon", "rpo"} <= set(METHODS)
    for name in with_settings:
        assert isinstance(getattr(MethodConfig(), name), METHODS[name].settings_class)
    config = from_dict(MethodConfig, {"name": "inpo", "inpo": {"inversion_steps": 4}})
    assert config.settings().inversion_steps == 4 and from_dict(MethodConfig, {"name": "dpo"}).settings() is None
    with pytest.raises(ConfigError, match=r"method.name: 'nope' is not allowed; choose one of \[.*'dpo'"):
        from_dict(DiffusionTrainConfig, {"method": {"name": "nope"}})


def test_every_registered_method_implements_the_declared_interface():
    for name, method in METHODS.items():
        assert issubclass(method, DiffusionMethod) and method.name == name
        assert not getattr(method, "__abstractmethods__", None), f"{name} leaves {method.__abstractmethods__} abstract"


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_method("dpo")(type("Another", (DiffusionMethod,), {"pair_scores": lambda *args: None}))


# --- capabilities, checked when the config loads ---------------------------------------------------------------------


def test_a_method_the_family_cannot_run_is_refused_when_the_config_loads(model_dirs):
    raw = {"model": {"pretrained": str(model_dirs["stable_audio"])}, "method": {"name": "ncp"}}
    with pytest.raises(ConfigError, match=r"method.name: 'ncp' needs a discrete DDPM noise schedule and a U-Net denoiser .* StableAudioFamily"):
        from_dict(DiffusionTrainConfig, raw)
    raw["method"]["name"] = "inpo"
    with pytest.raises(ConfigError, match=r"'inpo' needs a discrete DDPM noise schedule"):
        from_dict(DiffusionTrainConfig, raw)
    raw["method"]["name"] = "dpo"
    assert from_dict(DiffusionTrainConfig, raw).method.name == "dpo"


@pytest.mark.parametrize(("model", "weighting"), [("stable_audio", "min_snr"), ("sd", "sigma_sqrt"), ("sd", "cosmap")])
def test_a_weighting_the_family_cannot_compute_is_refused(model_dirs, model, weighting):
    raw = {"model": {"pretrained": str(model_dirs[model])}, "timesteps": {"weighting": weighting}}
    with pytest.raises(ConfigError, match=f"timesteps.weighting: '{weighting}' needs"):
        from_dict(DiffusionTrainConfig, raw)


@pytest.mark.parametrize("noise_range", [[0.5], [0.6, 0.4], [-0.1, 1.0], [0.0, 1.5]])
def test_a_bad_noise_range_is_refused(noise_range):
    with pytest.raises(ConfigError, match="timesteps.noise_range"):
        from_dict(DiffusionTrainConfig, {"timesteps": {"noise_range": noise_range}})


# --- training timesteps and weights ------------------------------------------------------------------------------------


def test_default_ddpm_timesteps_are_the_plain_uniform_draw(model_dirs):
    family = load_family(str(model_dirs["sd"]))
    drawn = family.sample_timesteps(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


def test_ddpm_timesteps_follow_the_configured_range_and_density(model_dirs):
    ranged = load_family(str(model_dirs["sd"]), timesteps=TimestepSettings(noise_range=[0.5, 0.75]))
    drawn = ranged.sample_timesteps(4000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert drawn.min() >= 500 and drawn.max() <= 749 and drawn.unique().numel() > 200

    settings = TimestepSettings(density="logit_normal", logit_mean=0.5, logit_std=0.8)
    family = load_family(str(model_dirs["sd"]), timesteps=settings)
    drawn = family.sample_timesteps(256, torch.device("cpu"), torch.Generator().manual_seed(1))
    # u = sigmoid(N(m, s)) (the SD3 paper's logit-normal), t = floor(1000·u), drawn independently here.
    normal = torch.normal(0.5, 0.8, (256,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, (torch.sigmoid(normal) * 1000).long())


@pytest.mark.parametrize("model", ["sd", "sd_v"])
def test_min_snr_weights_the_denoising_error_by_the_formula(model_dirs, model):
    """w = min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR + 1) for v targets, SNR = ᾱ/(1 − ᾱ)."""
    from diffalign.diffusion.methods import denoising_error

    family = load_family(str(model_dirs[model]), timesteps=TimestepSettings(weighting="min_snr", snr_gamma=2.0))
    timesteps = torch.tensor([0, 100, 400, 999])
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    expected = snr.clamp(max=2.0) / (snr if model == "sd" else snr + 1)
    torch.testing.assert_close(family.error_weights(timesteps).double(), expected, rtol=1e-5, atol=0)

    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs = family.denoiser_inputs(family.encode_prompts(["a red circle"] * 4), {})
    noisy, target = family.add_noise(latents, noise, timesteps), family.target(latents, noise, timesteps)
    with torch.no_grad():
        weighted = denoising_error(family, family.denoiser, noisy, timesteps, target, inputs)
        plain = (family.predict(family.denoiser, noisy, timesteps, inputs) - target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted.double(), plain.double() * expected, rtol=1e-5, atol=0)


def test_stable_audio_noise_levels_follow_the_configured_range(model_dirs):
    settings = TimestepSettings(noise_range=[0.0, 0.5])
    family = load_family(str(model_dirs["stable_audio"]), timesteps=settings)
    sigmas = family.sample_timesteps(512, torch.device("cpu"), torch.Generator().manual_seed(0))
    low, high = family.schedule.sigma_min, family.schedule.sigma_max
    # log σ at fraction u of [log σ_min, log σ_max], u in [0, 0.5): σ below the geometric midpoint.
    assert sigmas.min() >= low and sigmas.max() <= (low * high) ** 0.5 + 1e-4


# --- latents ---------------------------------------------------------------------------------------------------------


def test_latent_normalisation_scales_and_shifts_both_ways():
    normalization = LatentNormalization(scale=1.5305, shift=0.0609)  # SD3's VAE factors
    vae_latents = torch.randn(2, 16, 4, 4)
    latents = normalization.to_latents(vae_latents)
    torch.testing.assert_close(latents, (vae_latents - 0.0609) * 1.5305)
    torch.testing.assert_close(normalization.from_latents(latents), vae_latents)


def test_families_take_their_latent_factors_from_the_vae(model_dirs):
    family = load_family(str(model_dirs["sd"]))
    assert family.latent_normalization == LatentNormalization(family.vae.config.scaling_factor, 0.0)
    # The Oobleck VAE states no factor and its config is left as shipped.
    stable_audio = load_family(str(model_dirs["stable_audio"]))
    assert stable_audio.latent_normalization == LatentNormalization(1.0, 0.0)
    assert "scaling_factor" not in stable_audio.vae.config


def test_sampling_reads_no_scheduler_file_after_loading(model_dirs, monkeypatch):
    """Online methods sample every step: with a hub id, a scheduler read per call was a network check per call."""
    from diffusers.configuration_utils import ConfigMixin

    family = load_family(str(model_dirs["sd"]))

    def no_reading(*args, **kwargs):
        raise AssertionError("a scheduler file was read while sampling")

    monkeypatch.setattr(ConfigMixin, "load_config", classmethod(no_reading))  # what every from_pretrained reads
    pipeline = family.build_pipeline(family.denoiser)
    # The pipeline's sampler as its scheduler_config.json sets it.
    assert pipeline.scheduler.config.num_train_timesteps == family.scheduler_config["num_train_timesteps"]
    assert pipeline.scheduler.config.set_alpha_to_one == family.scheduler_config.get("set_alpha_to_one", True)
    generator = [torch.Generator().manual_seed(0)]
    latents = family.sample(family.denoiser, ["a red circle"], generator, num_inference_steps=2, guidance_scale=1.0)
    assert torch.isfinite(latents).all()


def test_importing_the_llm_trainer_does_not_import_diffusers():
    code = "import sys, diffalign.llm.trainer; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
