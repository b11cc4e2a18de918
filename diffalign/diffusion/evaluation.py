"""Evaluation during and after training: the base and the trained model sample the same prompts with the same
seeds, a labelled before/after grid is written (and sent to the trackers), and with a reward the held-out win rate
and mean rewards are returned."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.diffusion.config import DiffusionEvalConfig
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.sampling import Samples, generate_samples, sample_views, save_samples
from diffalign.eval.grid import to_pil
from diffalign.eval.prompts import read_prompts
from diffalign.eval.statistics import win_rate
from diffalign.hub import under_key
from diffalign.training.trackers import LoggedSamples


def eval_prompts(config: DiffusionEvalConfig) -> list[str]:
    """``eval.prompts`` plus those of ``eval.prompts_file``, cut to ``max_prompts``, each ``samples_per_prompt``
    times (sampled with consecutive seeds)."""
    prompts = list(config.prompts)
    if config.prompts_file:
        prompts += read_prompts(Path(config.prompts_file), key="eval.prompts_file")
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    return prompts * config.samples_per_prompt


class SampleEvaluation:
    """Base-vs-trained samples of fixed prompts; the base model's samples and scores are computed once."""

    def __init__(
        self, config: DiffusionEvalConfig, family: DiffusionFamily, base_model: ReferenceDenoiser, output_dir: Path
    ) -> None:
        self.config = config
        self.family = family
        self.base_model = base_model
        self.output_dir = output_dir
        self.prompts = eval_prompts(config)
        self._base: tuple[Samples, dict[str, Tensor]] | None = None
        self._scorers: dict[str, nn.Module] = {}
        self.logged: LoggedSamples | None = None  # the last evaluation's grid and samples, for the trackers

    def _generate(self, denoiser: nn.Module) -> Samples:
        return generate_samples(
            self.family,
            denoiser,
            self.prompts,
            seed=self.config.seed,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
        )

    def _score(self, samples: Samples) -> dict[str, Tensor]:
        """Each sample's score under ``eval.reward`` and every ``eval.metrics`` scorer, by scorer name."""
        keys = {name: f"eval.metrics[{index}]" for index, name in enumerate(self.config.metrics)}
        if self.config.reward:
            keys[self.config.reward] = "eval.reward"
        scores = {}
        for name, key in keys.items():
            if name not in self._scorers:
                from diffalign.rewards import build_scorer

                with under_key(key):
                    self._scorers[name] = build_scorer(name)
            scores[name] = self._scorers[name](samples, self.prompts).float().cpu()
        return scores

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self.prompts:
            return {}
        if self._base is None:
            # The evaluated model's adapters off (under FSDP/ZeRO-3 it is a gathered copy: the sharded policy
            # cannot run on the main process alone).
            with self.base_model.use(next(model.parameters()).device, policy=model) as base:
                base_samples = self._generate(base)
            self._base = (base_samples, self._score(base_samples))
        base_samples, base_scores = self._base
        aligned_samples = self._generate(model)
        aligned_scores = self._score(aligned_samples)
        reward = self.config.reward
        self.logged = self._save_grid(
            base_samples, aligned_samples, base_scores.get(reward), aligned_scores.get(reward), step
        )
        metrics = {}
        for name in self.config.metrics:
            metrics[f"{name}_base"] = base_scores[name].mean().item()
            metrics[f"{name}_aligned"] = aligned_scores[name].mean().item()
        if reward:
            metrics["win_rate"] = win_rate(aligned_scores[reward], base_scores[reward])
            metrics["reward_aligned"] = aligned_scores[reward].mean().item()
            metrics["reward_base"] = base_scores[reward].mean().item()
        return metrics

    def _save_grid(
        self, base: Samples, aligned: Samples, base_scores: Tensor | None, aligned_scores: Tensor | None, step: int
    ) -> LoggedSamples:
        """The first ``grid_prompts`` samples of both models in ``samples/step-N.png``, scored when there is a reward."""
        count = min(self.config.grid_prompts, len(self.prompts))
        rows = {"base": base[:count], "aligned": aligned[:count]}
        scores = None
        if base_scores is not None and aligned_scores is not None:
            scores = {"base": base_scores[:count], "aligned": aligned_scores[:count]}
        prompts = self.prompts[:count]
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        score_name = self.config.reward or "reward"
        grid = save_samples(rows, path, prompts, scores, score_name)
        views = {
            name: [to_pil(image, (image.shape[-1], image.shape[-2])) for image in images]
            for name, images in sample_views(rows).items()
        }
        listed = None if scores is None else {name: values.tolist() for name, values in scores.items()}
        return LoggedSamples(prompts, views, listed, score_name, grid, path)
