"""The diffusion recipe end to end on tiny pipelines: steps, export formats, exact resume, accumulation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import diffusion_config, trainable_snapshot
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl

from diffalign.diffusion.trainer import train
from diffalign.rewards import Scorer, register_scorer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        (family, prediction): builder(root / f"{family}-{prediction}", prediction_type=prediction)
        for family, builder in (("sd", build_tiny_sd), ("sdxl", build_tiny_sdxl))
        for prediction in ("epsilon", "v_prediction")
    }


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_one_step_trains_only_what_it_should(models, pairs_file, tmp_path, family, trainable, prediction):
    model_dir = models[(family, prediction)]
    config = diffusion_config(
        model_dir, pairs_file, tmp_path / "run", model={"trainable": trainable}, run={"max_steps": 1}, steps=2
    )
    metrics = train(config)
    assert (
        np.isfinite(metrics["loss"]) and abs(metrics["loss"] - np.log(2)) < 0.05
    )  # policy starts at reference
    assert metrics["grad_norm"] > 0
    trained = trainable_snapshot(tmp_path / "run")
    if trainable == "lora":
        assert trained and all("lora" in name for name in trained)
    else:
        base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
        assert len(trained) == len(base)
        assert any(not torch.equal(trained[name], base[name]) for name in base)


def test_lora_output_loads_into_a_stock_pipeline_and_changes_it(models, pairs_file, tmp_path):
    model_dir = models[("sd", "epsilon")]
    train(diffusion_config(model_dir, pairs_file, tmp_path, optim={"lr": 0.05}, steps=2))
    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipeline("a red circle", num_inference_steps=2, generator=generator, output_type="pt").images

    before = sample()
    pipeline.load_lora_weights(tmp_path / "final")
    after = sample()
    assert (after - before).abs().max() > 1e-4
    # Every saved adapter weight is in the loaded U-Net, attention projections included.
    saved = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipeline.unet, adapter_name=pipeline.get_active_adapters()[0])
    assert {f"unet.{name}" for name in loaded} == set(saved)
    assert any(".attn1.to_k." in name for name in saved)
    for name, value in loaded.items():
        torch.testing.assert_close(value, saved[f"unet.{name}"])


def test_lora_with_alpha_other_than_rank_loads_at_the_trained_strength(models, pairs_file, tmp_path):
    """The exported file carries alpha: the loaded U-Net computes what the trained one did (scale alpha/rank = 16,
    which a loader without the adapter's settings would replace by 1)."""
    from peft import LoraConfig

    model_dir = models[("sd", "epsilon")]
    lora = {"rank": 4, "alpha": 64.0, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
    train(diffusion_config(model_dir, pairs_file, tmp_path, model={"lora": lora}, optim={"lr": 0.05}, steps=2))

    trained_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    trained_unet.add_adapter(LoraConfig(r=4, lora_alpha=64, target_modules=lora["target_modules"]))
    missing = trained_unet.load_state_dict(trainable_snapshot(tmp_path), strict=False)
    assert not missing.unexpected_keys
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    base_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    pipeline.load_lora_weights(tmp_path / "final")

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 16, trained_unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        base = base_unet(latents, timestep, text).sample
        trained = trained_unet(latents, timestep, text).sample
        loaded = pipeline.unet(latents, timestep, text).sample
    assert (trained - base).abs().max() > 1e-3  # the adapter does change the U-Net
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)


def test_full_unet_output_loads_with_from_pretrained(models, pairs_file, tmp_path):
    model_dir = models[("sdxl", "epsilon")]
    train(diffusion_config(model_dir, pairs_file, tmp_path, model={"trainable": "full"}, steps=2))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "final" / "unet")
    trained = trainable_snapshot(tmp_path)
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in trained.items())
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_dir, unet=unet)
    assert pipeline.unet is unet


def test_resume_reproduces_the_uninterrupted_loss_trajectory(models, pairs_file, tmp_path):
    model_dir = models[("sd", "epsilon")]
    run = {"max_steps": 4, "checkpoint_every": 2}
    full = train(diffusion_config(model_dir, pairs_file, tmp_path / "full", run=run, steps=2))
    train(diffusion_config(model_dir, pairs_file, tmp_path / "split", run={**run, "max_steps": 2}, steps=2))
    resumed = train(diffusion_config(model_dir, pairs_file, tmp_path / "split", run={**run, "resume": "latest"}, steps=2))
    assert resumed["loss"] == full["loss"]  # the last step's loss, bit for bit
    full_weights, resumed_weights = (
        trainable_snapshot(tmp_path / "full"),
        trainable_snapshot(tmp_path / "split"),
    )
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_accumulating_two_half_batches_equals_one_batch(models, pairs_file, tmp_path):
    model_dir = models[("sd", "epsilon")]
    # Adam divides by √v, which turns fp32 rounding in tiny gradients into lr-sized steps. With eps far above
    # every |gradient| the update is lr/eps × the gradient, so comparing weights compares gradients.
    # A moderate β keeps the second step's loss from amplifying the first step's rounding by β = 5000.
    settings = {"optim": {"lr": 1e4, "eps": 1e4, "max_grad_norm": None}, "loss": {"beta": 50.0}}
    large = train(diffusion_config(model_dir, pairs_file, tmp_path / "large", run={"batch_size": 4}, **settings, steps=2))
    accumulated = train(
        diffusion_config(
            model_dir,
            pairs_file,
            tmp_path / "acc",
            run={"batch_size": 2, "gradient_accumulation_steps": 2},
            **settings, steps=2,
        )
    )
    assert accumulated["loss"] == pytest.approx(large["loss"], rel=1e-5)  # thread count changes the rounding
    large_weights, accumulated_weights = (
        trainable_snapshot(tmp_path / "large"),
        trainable_snapshot(tmp_path / "acc"),
    )
    scale = max(value.abs().max().item() for value in large_weights.values())
    for name, value in large_weights.items():  # equal up to fp32 summation order
        torch.testing.assert_close(accumulated_weights[name], value, rtol=0, atol=1e-5 * scale)


SCORED_IMAGES: list[torch.Tensor] = []


class RecordedRedScorer(Scorer):
    """The mean red channel of each image, recording the images it scored."""

    modality = "image"

    def forward(self, images, prompts=None, reference=None):
        SCORED_IMAGES.append(images.clone())
        return self.output(images[:, 0].mean(dim=(1, 2)))


register_scorer("test_recorded_red")(lambda device="cpu", dtype=torch.float32: RecordedRedScorer(device, dtype))


def test_eval_metrics_are_the_means_of_further_scorers_on_the_base_and_the_aligned_samples(
    sd_dir, pairs_file, tmp_path
):
    SCORED_IMAGES.clear()
    evaluation = {"prompts": ["a red circle", "a blue square"], "num_inference_steps": 2, "metrics": ["test_recorded_red"]}
    metrics = train(diffusion_config(sd_dir, pairs_file, tmp_path / "run", eval=evaluation))
    base, aligned = SCORED_IMAGES  # the base model is sampled once, then the trained one
    assert metrics["eval/test_recorded_red_base"] == pytest.approx(base[:, 0].mean().item())
    assert metrics["eval/test_recorded_red_aligned"] == pytest.approx(aligned[:, 0].mean().item())
    assert not torch.equal(base, aligned)
    assert "eval/win_rate" not in metrics  # without eval.reward there is nothing to compare sample by sample
