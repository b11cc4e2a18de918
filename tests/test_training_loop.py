"""The shared loop on a tiny regression recipe: exact resume, accumulation equivalence, NaN guard, crash safety."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from diffalign.training import OptimConfig, Recipe, RunConfig, StepOutput, make_accelerator, run_training
from diffalign.training.checkpoint import list_checkpoints
from diffalign.training.loop import NonFiniteLossError


class RegressionRecipe(Recipe):
    """y = w·x + noise, with fresh noise drawn from the global RNG every step (like diffusion noise)."""

    def __init__(self, output_dir: Path, poison_steps: set[int] = frozenset(), crash_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        inputs = torch.randn(64, 4)
        self.train_dataset = TensorDataset(inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        self.output_dir = output_dir
        self.losses: list[float] = []
        self.poison_steps = poison_steps
        self.crash_at = crash_at
        self.calls = 0

    def collate(self, items):
        inputs, targets = zip(*items)
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets)}

    def training_step(self, model, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        noise = 0.1 * torch.randn_like(batch["targets"])
        loss = ((model(batch["inputs"]).squeeze(-1) - batch["targets"] - noise) ** 2).mean()
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return StepOutput(loss=loss, metrics={"noise": noise.abs().mean()}, counts={"pairs": len(noise)})

    def save_final(self, model, output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), output_dir / "model.pt")


def train(tmp_path, recipe=None, **run_overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=6, batch_size=4, log_every=1, checkpoint_every=3, trackers=[],
        progress_bar=False, mixed_precision="no",
    )
    run = RunConfig(**{**settings, **run_overrides})
    recipe = recipe or RegressionRecipe(tmp_path)
    torch.manual_seed(123)
    metrics = run_training(recipe, run=run, optim=OptimConfig(lr=0.05, warmup_steps=2), accelerator=make_accelerator(run))
    return recipe, metrics


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full, _ = train(tmp_path / "full")
    first, _ = train(tmp_path / "split", max_steps=3)
    resumed, _ = train(tmp_path / "split", resume="latest")
    assert first.losses + resumed.losses == full.losses  # exact, not approximate
    assert torch.equal(resumed.model.weight, full.model.weight)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-0000003", "step-0000006"]


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    class NoNoise(RegressionRecipe):
        def training_step(self, model, batch):
            loss = ((model(batch["inputs"]).squeeze(-1) - batch["targets"]) ** 2).mean()
            return StepOutput(loss=loss)

    large, _ = train(tmp_path / "large", NoNoise(tmp_path / "large"), batch_size=8)
    accumulated, _ = train(tmp_path / "acc", NoNoise(tmp_path / "acc"), batch_size=4, gradient_accumulation_steps=2)
    torch.testing.assert_close(accumulated.model.weight, large.model.weight, atol=1e-6, rtol=0)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    recipe, metrics = train(tmp_path / "skip", RegressionRecipe(tmp_path / "skip", poison_steps={2}))
    assert metrics["nonfinite_steps"] == 1
    assert torch.isfinite(recipe.model.weight).all()
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps"):
        train(tmp_path / "stop", RegressionRecipe(tmp_path / "stop", poison_steps=set(range(1, 100))), max_nonfinite_steps=2)


def test_a_crash_saves_the_last_completed_step(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, RegressionRecipe(tmp_path, crash_at=5), checkpoint_every=100)
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-0000004"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_final_metrics_and_throughput_are_logged(tmp_path):
    _, metrics = train(tmp_path)
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
    recipe, _ = train(tmp_path, max_steps=3)
    assert walks == []
    assert len(recipe.losses) == 3
