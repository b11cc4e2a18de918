"""The shared loop on a tiny regression recipe: exact resume, accumulation equivalence, NaN guard, crash safety."""


import pytest
import torch
from helpers import RegressionRecipe, train_regression
from torch import nn

from diffalign.training import StepOutput
from diffalign.training.checkpoint import list_checkpoints
from diffalign.training.loop import NonFiniteLossError


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full, _ = train_regression(tmp_path / "full")
    first, _ = train_regression(tmp_path / "split", max_steps=3)
    resumed, _ = train_regression(tmp_path / "split", resume="latest")
    assert first.losses + resumed.losses == full.losses  # exact, not approximate
    assert torch.equal(resumed.model.weight, full.model.weight)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-0000003", "step-0000006"]


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    class NoNoise(RegressionRecipe):
        def training_step(self, model, batch):
            loss = ((model(batch["inputs"]).squeeze(-1) - batch["targets"]) ** 2).mean()
            return StepOutput(loss=loss)

    large, _ = train_regression(tmp_path / "large", NoNoise(tmp_path / "large"), batch_size=8)
    accumulated, _ = train_regression(tmp_path / "acc", NoNoise(tmp_path / "acc"), batch_size=4, gradient_accumulation_steps=2)
    torch.testing.assert_close(accumulated.model.weight, large.model.weight, atol=1e-6, rtol=0)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    recipe, metrics = train_regression(tmp_path / "skip", RegressionRecipe(tmp_path / "skip", poison_steps={2}))
    assert metrics["nonfinite_steps"] == 1
    assert torch.isfinite(recipe.model.weight).all()
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps"):
        train_regression(tmp_path / "stop", RegressionRecipe(tmp_path / "stop", poison_steps=set(range(1, 100))), max_nonfinite_steps=2)


def test_a_crash_saves_the_last_completed_step(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_regression(tmp_path, RegressionRecipe(tmp_path, crash_at=5), checkpoint_every=100)
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-0000004"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_final_metrics_and_throughput_are_logged(tmp_path):
    _, metrics = train_regression(tmp_path)
    assert {"loss", "grad_norm", "lr", "pairs_per_s", "peak_memory_gb", "noise"} <= set(metrics)
    assert (tmp_path / "final" / "model.pt").is_file()


def test_the_optimizer_step_walks_no_module_tree(tmp_path, monkeypatch):
    """Clipping and the finite-weights guard use the parameters listed once after prepare: on a large frozen
    model with a small adapter, listing them every step costs more than the update."""
    from diffalign.training.loop import TrainingLoop

    walks, inside = [], []
    named_modules = nn.Module.named_modules
    guarded_step = TrainingLoop._guarded_step

    def counted(self, *args, **kwargs):
        if inside:
            walks.append(type(self).__name__)
        return named_modules(self, *args, **kwargs)

    def watched(self):
        inside.append(True)
        try:
            return guarded_step(self)
        finally:
            inside.pop()

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    monkeypatch.setattr(TrainingLoop, "_guarded_step", watched)
    recipe, _ = train_regression(tmp_path, max_steps=3)
    assert walks == []
    assert len(recipe.losses) == 3
