"""TR-DPO's reference syncing in the diffusion trainer: the loss's frozen reference moves as TRL's
SyncRefModelCallback moves it, the evaluation base model does not, and a resumed run continues from it."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed
from helpers import diffusion_config
from safetensors.torch import load_file

from diffalign.diffusion.trainer import DiffusionRecipe, train
from diffalign.training import make_accelerator, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def sync_config(sd_dir, pairs, output, max_steps=2, **run):
    return diffusion_config(
        sd_dir,
        pairs,
        output,
        model={"trainable": "full", "reference_sync_steps": 1, "reference_mixup_alpha": 0.6},
        loss={"type": ["sigmoid"], "beta": 500.0},
        run={"max_steps": max_steps, **run},
    )


def test_the_reference_moves_as_trls_sync_callback_and_the_base_model_stays(sd_dir, pairs_file, tmp_path):
    """After step 1 (τ = 1): ref ← 0.6·θ_1 + 0.4·θ_0; step 2 trains against it; evaluation's base is θ_0."""
    config = sync_config(sd_dir, pairs_file, tmp_path)
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    recipe = DiffusionRecipe(config, accelerator)
    reference = recipe.reference_sync.reference
    assert recipe.method.reference.copy is reference and reference is not recipe.base_model.copy
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
    after_step_1 = load_file(tmp_path / "checkpoints" / "step-0000001" / "trainable.safetensors")
    moved = 0
    for name, parameter in reference.named_parameters():
        expected = 0.6 * after_step_1[name] + 0.4 * initial[name]
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=1e-5)
        moved += not torch.equal(after_step_1[name], initial[name])
    assert moved > 0
    for name, parameter in recipe.base_model.copy.named_parameters():
        assert torch.equal(parameter, initial[name]), name


def test_a_resumed_run_continues_from_the_moved_reference(sd_dir, pairs_file, tmp_path):
    train(sync_config(sd_dir, pairs_file, tmp_path / "straight", max_steps=3))
    train(sync_config(sd_dir, pairs_file, tmp_path / "resumed", max_steps=2))
    train(sync_config(sd_dir, pairs_file, tmp_path / "resumed", max_steps=3, resume="latest"))
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000003" / "trainable.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000003" / "trainable.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_syncing_needs_a_full_fine_tune(sd_dir, pairs_file, tmp_path):
    with pytest.raises(ValueError, match="reference_sync_steps"):
        diffusion_config(sd_dir, pairs_file, tmp_path, model={"trainable": "lora", "reference_sync_steps": 2})
