"""Every loss (and every sequence-score option) of the core on every kind of model there is: ε- and
v-prediction diffusion (tiny SD pipelines), flow matching (a tiny SD3), text-to-music (the toy MusicLDM) and the
toy LLM. One step each: a
finite loss and a non-zero gradient on the trained weights, or a clear config error where the loss needs what
the modality lacks (per-token log-probs, and lengths for Diffusion-DPO's per-sample scores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_pipelines import build_tiny_sd, build_tiny_sd3

from diffalign.config import ConfigError, from_dict
from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.llm.config import LLMTrainConfig
from diffalign.llm.trainer import LLMRecipe
from diffalign.losses import LOSSES, compute_loss
from diffalign.training import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Every registered loss alone, then the options on top of a loss that takes them.
CASES = [(name, {}) for name in LOSSES] + [
    ("sigmoid", {"ld_alpha": 0.5}),
    ("sigmoid", {"use_weighting": True}),
    ("sigmoid", {"rpo_alpha": 1.0}),
    ("simpo", {"alphapo_alpha": 0.25}),
]
CASE_IDS = [name + "".join(f"-{key}" for key in options) for name, options in CASES]
DIFFUSION_FAMILIES = ["sd_epsilon", "sd_v_prediction", "flow_sd3", "music"]
LATENTS = {"sd_epsilon": (4, 8, 8), "sd_v_prediction": (4, 8, 8), "flow_sd3": (16, 8, 8), "music": (8, 16, 8)}


def loss_section(name: str, options: dict) -> dict:
    return {"type": [name], "beta": 0.1, "label_smoothing": 1e-3 if name == "exo_pair" else 0.0, **options}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "sd_epsilon": build_tiny_sd(root / "eps"),
        "sd_v_prediction": build_tiny_sd(root / "v", prediction_type="v_prediction"),
        "flow_sd3": build_tiny_sd3(root / "sd3"),
        "music": ASSETS / "toy-t2m",
    }


@pytest.fixture(scope="module")
def families(family_dirs):
    """Each family with a fully trainable denoiser and a frozen copy of it as the reference."""
    out = {}
    for name, directory in family_dirs.items():
        family = load_family(str(directory))
        policy = family.denoiser.requires_grad_(True)
        torch.manual_seed(0)
        with torch.no_grad():  # policy ≠ reference, as after some training
            reference = ReferenceDenoiser(policy, frozen_copy=True)
            for parameter in policy.parameters():
                parameter.add_(1e-3 * torch.randn_like(parameter))
        generator = torch.Generator().manual_seed(1)
        shape = (2, *LATENTS[name])
        batch = LatentPairBatch(
            chosen_latents=torch.randn(shape, generator=generator),
            rejected_latents=torch.randn(shape, generator=generator),
            prompt_embeds=family.encode_prompts(["a red circle", "a small blue square"]),
            noise_seeds=[11, 12],
        )
        out[name] = (family, policy, reference, batch)
    return out


def assert_finite_loss_and_gradient(loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> None:
    assert math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in parameters if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) > 0


@pytest.mark.parametrize("family_name", DIFFUSION_FAMILIES)
@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_every_loss_on_every_diffusion_family(families, family_dirs, family_name, name, options):
    raw = {"model": {"pretrained": str(family_dirs[family_name])}, "loss": loss_section(name, options)}
    token_level = LOSSES[name].needs_token_kl or "ld_alpha" in options or "use_weighting" in options
    if token_level:
        with pytest.raises(
            ConfigError, match="needs per-token log-probs, which diffusion scores do not have"
        ):
            from_dict(DiffusionTrainConfig, raw)
        return
    if LOSSES[name].needs_lengths:  # Diffusion-DPO's scores have none (NCP's count one unit per sample)
        with pytest.raises(ConfigError, match="which need completion lengths; method.name: dpo"):
            from_dict(DiffusionTrainConfig, raw)
        return
    config = from_dict(DiffusionTrainConfig, raw)
    family, policy, reference, batch = families[family_name]
    method = DiffusionDPO(family, reference if LOSSES[name].needs_reference else None)
    policy.zero_grad(set_to_none=True)
    scores, _ = method.pair_scores(policy, batch)
    output = compute_loss(scores, config.loss)
    assert_finite_loss_and_gradient(output.loss, list(policy.parameters()))


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_every_loss_on_the_toy_llm(tmp_path, name, options):
    data = ASSETS / "toy-llm" / "data" / "conversational_train.jsonl"
    config = from_dict(
        LLMTrainConfig,
        {
            "model": {"pretrained": str(ASSETS / "toy-llm"), "lora": {"rank": 4}},
            "data": {"path": str(data), "max_rows": 8, "max_prompt_length": 32, "max_length": 64},
            "loss": loss_section(name, options),
            "run": {"output_dir": str(tmp_path), "mixed_precision": "no", "trackers": []},
        },
    )
    recipe = LLMRecipe(config, make_accelerator(config.run))
    output = recipe.training_step(recipe.model, recipe.collate([0, 1, 2, 3]))
    assert_finite_loss_and_gradient(output.loss, [p for p in recipe.model.parameters() if p.requires_grad])
