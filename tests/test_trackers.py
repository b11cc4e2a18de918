"""Evaluation samples reach every configured tracker: TensorBoard images and text, W&B images and tables (offline),
MLflow artifacts; W&B/MLflow runs get the configured project, name and tags."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
from helpers import diffusion_config
from PIL import Image

from diffalign.config import from_dict
from diffalign.diffusion.trainer import train
from diffalign.training.config import RunConfig
from diffalign.training.trackers import LoggedSamples, log_samples, tracker_settings

EVAL = {"prompts": ["a red circle", "a blue square"], "num_inference_steps": 2, "reward": "toy_t2i"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorboard_gets_the_labelled_grid_and_the_prompts_at_every_evaluation(sd_dir, pairs_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator

    run = tmp_path / "run"
    train(
        diffusion_config(
            sd_dir, pairs_file, run, steps=2, eval=EVAL,
            run={"trackers": ["tensorboard"], "eval_every": 1, "wandb_project": "toy-project"},
        )
    )
    events = EventAccumulator(str(run / "toy-project"), size_guidance={IMAGES: 0, TENSORS: 0})
    events.Reload()
    grids = events.Images("samples/grid")
    assert [grid.step for grid in grids] == [1, 2]
    for grid in grids:
        logged = np.array(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB"))
        saved = np.array(Image.open(run / "samples" / f"step-{grid.step:07d}.png").convert("RGB"))
        np.testing.assert_array_equal(logged, saved)
    tables = events.Tensors("samples/table/text_summary")
    assert [table.step for table in tables] == [1, 2]
    lines = tables[-1].tensor_proto.string_val[0].decode().splitlines()
    assert lines[0] == "| prompt | base toy_t2i | aligned toy_t2i |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [row[0] for row in rows] == EVAL["prompts"]
    # Each prompt's scores: their means are the step's logged eval rewards.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [record for record in logged if record["step"] == 2 and "eval/reward_aligned" in record][-1]
    for column, key in ((1, "eval/reward_base"), (2, "eval/reward_aligned")):
        assert np.mean([float(row[column]) for row in rows]) == pytest.approx(final[key], abs=1e-4)


def test_wandb_gets_the_grid_and_a_table_under_the_configured_project_name_and_tags(
    sd_dir, pairs_file, tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    started: list[dict] = []
    original = wandb.init

    def recording_init(**kwargs):
        started.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    run = tmp_path / "run"
    train(
        diffusion_config(
            sd_dir, pairs_file, run, steps=2, eval=EVAL,
            run={"trackers": ["wandb"], "wandb_project": "toy-project", "run_name": "first-try", "tags": ["a", "b"]},
        )
    )
    assert started == [{"project": "toy-project", "dir": str(run), "name": "first-try", "tags": ["a", "b"]}]
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    grid = next((media / "images" / "samples").glob("grid_2_*.png"))
    assert Image.open(grid).size == Image.open(run / "samples" / "step-0000002.png").size
    table = json.loads(next((media / "table" / "samples").glob("table_2_*.table.json")).read_text())
    assert table["columns"] == ["prompt", "base", "base toy_t2i", "aligned", "aligned toy_t2i"]
    assert [row[0] for row in table["data"]] == EVAL["prompts"]


def test_mlflow_gets_the_grid_file_and_the_table_as_artifacts(tmp_path, monkeypatch):
    """The dispatch to accelerate's MLflow tracker, with mlflow itself stood in for (it is not a dependency)."""
    logged_text: list[tuple[str, str]] = []
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(log_text=lambda t, f: logged_text.append((f, t))))
    artifacts: list[tuple[str, str]] = []
    tracker = types.SimpleNamespace(name="mlflow", log_artifact=lambda path, artifact_path: artifacts.append((path, artifact_path)))
    grid_file = tmp_path / "step.png"
    Image.new("RGB", (4, 4)).save(grid_file)
    samples = LoggedSamples(["a cat"], {"base": ["meow"], "aligned": ["purr"]}, {"base": [0.1], "aligned": [0.9]},
                            "toy_reward", grid=None, grid_file=grid_file)
    log_samples(types.SimpleNamespace(trackers=[tracker]), samples, step=7)
    assert artifacts == [(str(grid_file), "samples")]
    assert logged_text == [("samples/step-0000007.md", samples.markdown())]
    assert "| a cat | meow | 0.1000 | purr | 0.9000 |" in samples.markdown()


def test_run_names_and_tags_go_to_the_trackers_that_take_them():
    run = from_dict(RunConfig, {"output_dir": "out", "wandb_project": "p", "run_name": "n", "tags": ["x"]})
    project, settings = tracker_settings(run)
    assert project == "p"
    assert settings == {"wandb": {"dir": "out", "name": "n", "tags": ["x"]}, "mlflow": {"run_name": "n", "tags": {"x": "true"}}}
    assert tracker_settings(RunConfig())[0] == "diffalign"


def test_markdown_cells_escape_pipes_and_line_breaks():
    samples = LoggedSamples(["a|b"], {"base": ["one\ntwo"], "aligned": ["x"]}, None)
    assert samples.markdown().splitlines()[-1] == "| a\\|b | one<br>two | x |"
