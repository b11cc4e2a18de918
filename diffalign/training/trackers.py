"""Experiment trackers (TensorBoard, W&B, MLflow through accelerate): how a run is named and how evaluation
samples reach each tracker.

``run.wandb_project`` names the W&B project, the MLflow experiment and the TensorBoard folder under
``run.output_dir`` (``diffalign`` by default); ``run.run_name`` and ``run.tags`` name and tag the W&B and MLflow
runs. Samples go to every configured tracker at each evaluation (``run.eval_every`` and the end):

- TensorBoard: the labelled grid as an image (``samples/grid``) and a table of prompts with each model's score
  (or completion) as text (``samples/table``);
- W&B: the grid, and a table with one row per prompt: the prompt, each model's sample (image or text) and score;
- MLflow: the grid's PNG as an artifact under ``samples/`` and the table as ``samples/step-N.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from diffalign.training.config import RunConfig

DEFAULT_PROJECT = "diffalign"


def tracker_settings(run: RunConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    """The project name and the per-tracker keyword arguments of ``accelerator.init_trackers``."""
    wandb: dict[str, Any] = {"dir": run.output_dir}
    mlflow: dict[str, Any] = {}
    if run.run_name:
        wandb["name"] = mlflow["run_name"] = run.run_name
    if run.tags:
        wandb["tags"] = list(run.tags)
        mlflow["tags"] = {tag: "true" for tag in run.tags}  # MLflow tags are key-value pairs
    return run.wandb_project or DEFAULT_PROJECT, {"wandb": wandb, "mlflow": mlflow}


@dataclass
class LoggedSamples:
    """An evaluation's samples as the trackers show them.

    ``rows`` maps a model (``base``, ``aligned``) to one sample per prompt: PIL images or completion texts;
    ``scores`` the same models to each sample's score under ``score_name`` (None: unscored). ``grid`` is the
    labelled grid of image samples and ``grid_file`` where it was saved."""

    prompts: list[str]
    rows: dict[str, list[Any]]
    scores: dict[str, list[float]] | None = None
    score_name: str = "reward"
    grid: Image.Image | None = None
    grid_file: Path | None = None

    def markdown(self) -> str:
        """The samples as a markdown table: a prompt per row, each model's score (and text) per column."""
        texts = all(isinstance(sample, str) for row in self.rows.values() for sample in row)
        header = ["prompt"]
        for name in self.rows:
            header += [name] if texts else []
            header += [f"{name} {self.score_name}"] if self.scores is not None else []
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for index, prompt in enumerate(self.prompts):
            cells = [cell_text(prompt)]
            for name, samples in self.rows.items():
                cells += [cell_text(samples[index])] if texts else []
                cells += [f"{self.scores[name][index]:.4f}"] if self.scores is not None else []
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def cell_text(text: str) -> str:
    """``text`` inside one markdown table cell: pipes escaped, line breaks as ``<br>``."""
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def log_samples(accelerator: Accelerator, samples: LoggedSamples, step: int) -> None:
    """Send ``samples`` to every tracker the run logs to (on the main process; a no-op without trackers)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            writer = tracker.tracker
            if samples.grid is not None:
                writer.add_image("samples/grid", np.asarray(samples.grid), step, dataformats="HWC")
            writer.add_text("samples/table", samples.markdown(), step)
            writer.flush()
        elif tracker.name == "wandb":
            tracker.tracker.log(wandb_values(samples), step=step)
        elif tracker.name == "mlflow":
            if samples.grid_file is not None:
                tracker.log_artifact(str(samples.grid_file), artifact_path="samples")
            import mlflow

            mlflow.log_text(samples.markdown(), f"samples/step-{step:07d}.md")


def wandb_values(samples: LoggedSamples) -> dict[str, Any]:
    import wandb

    columns, data = ["prompt"], []
    for name in samples.rows:
        columns += [name] + ([f"{name} {samples.score_name}"] if samples.scores is not None else [])
    for index, prompt in enumerate(samples.prompts):
        row: list[Any] = [prompt]
        for name, items in samples.rows.items():
            item = items[index]
            row.append(item if isinstance(item, str) else wandb.Image(item, caption=f"{name}: {prompt}"))
            if samples.scores is not None:
                row.append(samples.scores[name][index])
        data.append(row)
    values: dict[str, Any] = {"samples/table": wandb.Table(columns=columns, data=data)}
    if samples.grid is not None:
        values["samples/grid"] = wandb.Image(samples.grid, caption=" · ".join(samples.prompts))
    return values
