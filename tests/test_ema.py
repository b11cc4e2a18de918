"""run.ema: the average of the trained weights against its formula, what evaluation and export see, exact resume."""

from __future__ import annotations

import pytest
import torch
from helpers import RegressionRecipe
from safetensors.torch import load_file

from diffalign.config import ConfigError, from_dict
from diffalign.training import OptimConfig, RunConfig, make_accelerator, run_training
from diffalign.training.config import EMAConfig
from diffalign.training.ema import EMA_FILE, read_updates


class RecordingRecipe(RegressionRecipe):
    """Records the weights every step starts from, and the weights evaluation and export are given."""

    def __init__(self, output_dir):
        super().__init__(output_dir)
        self.step_weights: list[torch.Tensor] = []
        self.evaluated: dict[int, torch.Tensor] = {}

    def training_step(self, model, batch):
        self.step_weights.append(model.weight.detach().clone())
        return super().training_step(model, batch)

    def evaluate(self, model, step):
        self.evaluated[step] = model.weight.detach().clone()
        return {}


def train(output_dir, **run_overrides):
    settings = dict(
        output_dir=str(output_dir), max_steps=6, batch_size=4, log_every=1, checkpoint_every=3, trackers=[],
        progress_bar=False, mixed_precision="no", ema=EMAConfig(decay=0.2, every=2),
    )
    run = RunConfig(**{**settings, **run_overrides})
    recipe = RecordingRecipe(output_dir)
    torch.manual_seed(123)
    run_training(recipe, run=run, optim=OptimConfig(lr=0.05, warmup_steps=2), accelerator=make_accelerator(run))
    return recipe


def expected_average(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    """diffusers' EMAModel with no warm-up offset: the k-th update uses d_k = min(decay, k / (9 + k)), d_1 = 0."""
    average = None
    for k, weight in enumerate(weights, start=1):
        d = 0.0 if k == 1 else min(decay, k / (9 + k))
        average = weight.clone() if average is None else d * average + (1 - d) * weight
    return average


def test_the_average_follows_the_formula_and_is_what_evaluation_and_export_see(tmp_path):
    recipe = train(tmp_path, eval_every=4)
    trained = [*recipe.step_weights[1:], recipe.model.weight.detach()]  # θ_1 … θ_6
    # Updates after steps 2, 4 and 6 (every: 2) with d = 0, 2/11 and min(0.2, 3/12) = 0.2: the cap applies.
    after_4 = expected_average([trained[1], trained[3]], 0.2)
    after_6 = expected_average([trained[1], trained[3], trained[5]], 0.2)
    manual = 0.2 * (2 / 11 * trained[1] + 9 / 11 * trained[3]) + 0.8 * trained[5]
    torch.testing.assert_close(after_6, manual)
    torch.testing.assert_close(recipe.evaluated[4], after_4, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(recipe.evaluated[6], after_6, rtol=1e-6, atol=1e-7)
    final = torch.load(tmp_path / "final" / "model.pt")
    torch.testing.assert_close(final["weight"], after_6, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(after_6, trained[5])  # the average is not the last weights
    # Training continued on the raw weights: the step after the evaluation started from θ_4, not the average.
    assert torch.equal(recipe.step_weights[4], trained[3])
    checkpoint = tmp_path / "checkpoints" / "step-0000006"
    assert read_updates(checkpoint / EMA_FILE) == 3
    torch.testing.assert_close(load_file(checkpoint / EMA_FILE)["weight"], after_6, rtol=1e-6, atol=1e-7)


def test_resume_continues_the_average_exactly(tmp_path):
    full = train(tmp_path / "full", ema=EMAConfig(decay=0.9, every=1))
    train(tmp_path / "split", ema=EMAConfig(decay=0.9, every=1), max_steps=3)
    resumed = train(tmp_path / "split", ema=EMAConfig(decay=0.9, every=1), resume="latest")
    assert torch.equal(resumed.model.weight, full.model.weight)
    for name in ("full", "split"):
        assert read_updates(tmp_path / name / "checkpoints" / "step-0000006" / EMA_FILE) == 6
    full_average = load_file(tmp_path / "full" / "checkpoints" / "step-0000006" / EMA_FILE)
    resumed_average = load_file(tmp_path / "split" / "checkpoints" / "step-0000006" / EMA_FILE)
    assert all(torch.equal(full_average[name], resumed_average[name]) for name in full_average)
    assert torch.equal(
        torch.load(tmp_path / "full" / "final" / "model.pt")["weight"],
        torch.load(tmp_path / "split" / "final" / "model.pt")["weight"],
    )


def test_ema_settings_are_checked():
    with pytest.raises(ConfigError, match=r"run\.ema\.decay must be in \[0, 1\)"):
        from_dict(RunConfig, {"ema": {"decay": 1.0}})
    with pytest.raises(ConfigError, match=r"run\.ema\.every must be >= 1"):
        from_dict(RunConfig, {"ema": {"every": 0}})
    assert from_dict(RunConfig, {"ema": {"decay": 0.99}}).ema == EMAConfig(decay=0.99, every=1)
