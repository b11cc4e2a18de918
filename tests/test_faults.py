"""Hostile inputs and failures: each ends in a clear error, a counted skip or a safe recovery, and never in a lost
or a bad checkpoint. The README's "Reliability" table lists these cases."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from helpers import RegressionRecipe, data_config, image_bytes, pick_a_pic_columns, quiet_run, write_parquet
from PIL import Image
from transformers import AutoTokenizer

from diffalign import cli
from diffalign.config import ConfigError, load_config, save_config
from diffalign.diffusion.cache import _ShardStore
from diffalign.diffusion.data import DiffusionDataConfig, load_preference_pairs
from diffalign.diffusion.methods.seppo import CheckpointBank
from diffalign.eval import report as eval_report
from diffalign.eval.prompts import PromptSetConfig, write_prompt_split
from diffalign.files import current_umask, folder_written_whole, read_cache_file, save_tensors_atomically
from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import load_preference_items
from diffalign.toy import __main__ as toy_main
from diffalign.training import OptimConfig, RunConfig, make_accelerator, run_training
from diffalign.training.checkpoint import CheckpointWriteError, CorruptCheckpointError, list_checkpoints
from diffalign.training.loop import NonFiniteUpdateError
from diffalign.training.resume import config_changes
from diffalign.training.signals import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]

# --- config values refused before any model loads ------------------------------------------------------------

REFUSED = [
    ("toy_llm_dpo", "optim.max_grad_norm=-1", "optim.max_grad_norm must be > 0"),  # gradient ascent
    ("toy_llm_dpo", "optim.max_grad_norm=0", "optim.max_grad_norm must be > 0"),  # no update at all
    ("toy_llm_dpo", "optim.lr=.nan", "optim.lr: expected a finite number"),
    ("toy_llm_dpo", "optim.lr=.inf", "optim.lr: expected a finite number"),
    ("toy_llm_dpo", "optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("toy_llm_dpo", "optim.eps=-1e-8", "optim.eps must be > 0"),
    ("toy_llm_dpo", "optim.betas=[0.9, 1.0]", r"optim.betas must be two values in \[0, 1\)"),
    ("toy_llm_dpo", "optim.betas=[-0.1, 0.9]", r"optim.betas must be two values in \[0, 1\)"),
    ("toy_llm_dpo", "loss.beta=.inf", "loss.beta: expected a finite number"),
    ("toy_llm_dpo", "loss.beta=.nan", "loss.beta: expected a finite number"),
    ("toy_llm_dpo", "loss.weights=[.nan, 1.0]", r"loss.weights\[0\]: expected a finite number"),
    ("toy_llm_dpo", "loss.weights=[-1.0, 1.0]", "loss.weights=.* must be finite and >= 0"),
    ("toy_llm_dpo", "model.lora.dropout=1.5", r"model.lora.dropout must be a probability in \[0, 1\)"),
    ("toy_llm_dpo", "model.lora.alpha=-4", "model.lora.alpha must be > 0"),
    (
        "toy_llm_dpo",
        ("model.share_prompt=true", "model.padding_free=true"),
        "model.share_prompt and model.padding_free are two layouts of a batch's rows; set one of them",
    ),
    (
        "toy_llm_dpo",
        ("model.share_prompt=true", "model.attn_implementation=eager"),
        "model.share_prompt needs SDPA attention .* model.attn_implementation is 'eager'",
    ),
    ("toy_dpo", "model.lora.alpha=-4", "model.lora.alpha must be > 0"),
    ("toy_dpo", "data.resolution=20", "data.resolution: 20 px is not a multiple of 8, which StableDiffusion"),
    ("toy_dpo", "data.max_aspect_ratio=0.5", "data.max_aspect_ratio must be >= 1"),
    # Refused before these checks existed, kept here so the table stays complete:
    ("toy_llm_dpo", "optim.lr=-1", "optim.lr must be > 0"),
    ("toy_llm_dpo", "run.max_steps=0", "run.max_steps must be >= 1"),
    ("toy_dpo", "data.caption_dropout=.nan", "data.caption_dropout"),
    # One check (config.require_at_least_one) words every count of every section alike:
    ("toy_dpo", "run.keep_last_checkpoints=0", "run.keep_last_checkpoints must be >= 1, got 0"),
    ("toy_seppo", "method.seppo.bank_size=0", "method.seppo.bank_size must be >= 1, got 0"),
    ("toy_llm_grpo", "rollout.iterations=0", "rollout.iterations must be >= 1, got 0"),
    ("toy_llm_grpo", "data.max_rows=0", "data.max_rows must be >= 1 or null, got 0"),
    ("toy_llm_dpo", "eval.max_new_tokens=-2", "eval.max_new_tokens must be >= 1, got -2"),
    ("eval_toy", "generation.batch_size=0", "generation.batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize(("config", "override", "message"), REFUSED)
def test_bad_values_are_refused_when_the_config_loads(config, override, message):
    with pytest.raises(ConfigError, match=message):
        overrides = [override] if isinstance(override, str) else list(override)
        load_config(ROOT / "configs" / f"{config}.yaml", overrides)


def test_no_clipping_is_spelled_null():
    config = load_config(ROOT / "configs" / "toy_llm_dpo.yaml", ["optim.max_grad_norm=null"])
    assert config.optim.max_grad_norm is None


# --- the loop on a tiny regression recipe ---------------------------------------------------------------------


@dataclass
class LoopConfig:
    """The part of a trainer config the loop stores in checkpoints and compares on resume."""

    run: RunConfig
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, warmup_steps=2))


def loop_config(output: Path, **run) -> LoopConfig:
    return LoopConfig(run=RunConfig(**quiet_run(output, **{"max_steps": 6, "batch_size": 4, "checkpoint_every": 3, **run})))


def fit(config: LoopConfig, recipe: RegressionRecipe | None = None) -> RegressionRecipe:
    recipe = recipe or RegressionRecipe(Path(config.run.output_dir))
    torch.manual_seed(123)
    np.random.seed(123)
    run_training(
        recipe, run=config.run, optim=config.optim, accelerator=make_accelerator(config.run), config=config
    )
    return recipe


class NumpyNoiseRecipe(RegressionRecipe):
    """Draws part of its noise from NumPy's global RNG, whose state a checkpoint must restore exactly."""

    def training_step(self, model, batch):
        shift = torch.from_numpy(np.random.standard_normal(batch["targets"].shape).astype(np.float32))
        return super().training_step(model, {**batch, "targets": batch["targets"] + 0.1 * shift})


class Payload:
    """A pickle that runs code when loaded: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_is_exact_with_numpy_noise_and_checkpoints_load_as_weights_only(tmp_path):
    full = fit(loop_config(tmp_path / "full"), NumpyNoiseRecipe(tmp_path))
    first = fit(loop_config(tmp_path / "split", max_steps=3), NumpyNoiseRecipe(tmp_path))
    resumed = fit(loop_config(tmp_path / "split", resume="latest"), NumpyNoiseRecipe(tmp_path))
    assert first.losses + resumed.losses == full.losses
    assert torch.equal(resumed.model.weight, full.model.weight)
    for file in (tmp_path / "split" / "checkpoints" / "step-0000003").glob("*.pt"):
        torch.load(file, weights_only=True)  # every file: tensors and plain values only


@pytest.mark.parametrize("file", ["optimizer.pt", "rng-0.pt", "scheduler.pt"])
def test_a_crafted_checkpoint_file_cannot_run_code(tmp_path, file):
    fit(loop_config(tmp_path, max_steps=3))
    checkpoint = tmp_path / "checkpoints" / "step-0000003"
    marker = tmp_path / "code-ran"
    torch.save({"state": Payload(marker)}, checkpoint / file)
    with pytest.raises(CorruptCheckpointError, match=rf"{file} holds more than tensors and plain values"):
        fit(loop_config(tmp_path, resume=str(checkpoint)))
    assert not marker.exists()


def test_an_update_that_makes_weights_nan_stops_the_run_and_is_never_saved(tmp_path):
    config = loop_config(tmp_path, checkpoint_every=100)
    config.optim.lr = math.inf  # what the config refuses, set behind its back: the first update is NaN
    with pytest.raises(NonFiniteUpdateError, match="made trained weights NaN or inf"):
        fit(config)
    assert list_checkpoints(tmp_path / "checkpoints") == []


class PoisonsWeightsThenCrashes(RegressionRecipe):
    def training_step(self, model, batch):
        if self.calls == 4:  # after three completed steps
            with torch.no_grad():
                model.weight.fill_(math.nan)
            raise KeyboardInterrupt
        return super().training_step(model, batch)


def test_the_emergency_save_refuses_non_finite_weights(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.ERROR, logger="diffalign"):
        fit(loop_config(tmp_path, checkpoint_every=100), PoisonsWeightsThenCrashes(tmp_path))
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert "NaN or inf" in caplog.text


def test_a_crash_saves_the_last_step_and_resumes_exactly(tmp_path):
    """Passed before the hardening too: an error saves the last completed step, ignored .tmp folders aside."""
    full = fit(loop_config(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        fit(loop_config(tmp_path / "crash", checkpoint_every=100), RegressionRecipe(tmp_path, crash_at=5))
    (tmp_path / "crash" / "checkpoints" / "step-0000005.tmp").mkdir()  # a save killed half-way
    resumed = fit(loop_config(tmp_path / "crash", resume="latest"))
    assert torch.equal(resumed.model.weight, full.model.weight)


class SignalsItself(RegressionRecipe):
    def __init__(self, output_dir: Path, signal_number: int, at_call: int) -> None:
        super().__init__(output_dir)
        self.signal_number, self.at_call = signal_number, at_call

    def training_step(self, model, batch):
        if self.calls + 1 == self.at_call:
            os.kill(os.getpid(), self.signal_number)
        return super().training_step(model, batch)


class SignalEndedTraining(Exception):
    pass


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_checkpoint_the_step_and_stop(tmp_path, signal_number):
    def fallback(number, frame):  # in place of the default action (ending pytest) should the loop not handle it
        raise SignalEndedTraining

    previous = signal.signal(signal_number, fallback)
    try:
        with pytest.raises(TrainingInterrupted, match="continue with run.resume=latest") as stop:
            fit(loop_config(tmp_path / "stopped", checkpoint_every=100), SignalsItself(tmp_path, signal_number, 2))
    finally:
        assert signal.signal(signal_number, previous) is fallback  # the loop put the handler back
    assert stop.value.signal_number == signal_number
    assert [path.name for path in list_checkpoints(tmp_path / "stopped" / "checkpoints")] == ["step-0000002"]
    resumed = fit(loop_config(tmp_path / "stopped", resume="latest"))
    assert torch.equal(resumed.model.weight, fit(loop_config(tmp_path / "full")).model.weight)


def test_the_command_line_exits_with_the_signal_status(monkeypatch, capsys):
    def stopped(config):
        raise TrainingInterrupted(signal.SIGTERM, 7, Path("out/checkpoints/step-0000007"))

    monkeypatch.setattr("diffalign.llm.trainer.train", stopped)
    assert cli.main(["train", str(ROOT / "configs" / "toy_llm_dpo.yaml")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 7" in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_the_free_space_and_leaves_nothing_behind(tmp_path, monkeypatch):
    real_save = torch.save
    writes_after_failure = []

    def save(value, path, *args, **kwargs):
        if writes_after_failure or Path(path).name == "optimizer.pt":
            writes_after_failure.append(Path(path).name)
            Path(path).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        real_save(value, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError, match=r"optimizer\.pt .*inline_container.*free on its disk"):
        fit(loop_config(tmp_path))
    assert writes_after_failure == ["optimizer.pt"]  # no emergency save onto the same disk
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no step-3, no step-3.tmp


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    full = fit(loop_config(tmp_path / "full", max_steps=9))
    fit(loop_config(tmp_path / "run", max_steps=6))
    damaged = tmp_path / "run" / "checkpoints" / "step-0000006" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError, match=rf"{damaged} cannot be read"):
        fit(loop_config(tmp_path / "run", max_steps=9, resume=str(damaged.parent)))
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        resumed = fit(loop_config(tmp_path / "run", max_steps=9, resume="latest"))
    assert f"{damaged} cannot be read" in caplog.text and "step-0000003, instead" in caplog.text
    assert torch.equal(resumed.model.weight, full.model.weight)


def test_a_damaged_cache_shard_names_its_path(tmp_path):
    store = _ShardStore(tmp_path / "images", shard_size=1)
    store.add("key", {"mean": torch.zeros(4)})
    (shard,) = (tmp_path / "images").glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"cache file {shard} is damaged.*delete it"):
        _ShardStore(tmp_path / "images", shard_size=1)


def half_written_save(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x08\x00 half a file")
    raise OSError(28, "No space left on device")


def test_a_failed_tensor_file_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "reference.safetensors"
    save_tensors_atomically({"errors": torch.ones(3)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()  # not safetensors' 0600
    monkeypatch.setattr("diffalign.files.save_file", half_written_save)
    with pytest.raises(OSError, match="No space left"):
        save_tensors_atomically({"errors": torch.zeros(3)}, path)
    assert read_cache_file(path)["errors"].tolist() == [1.0, 1.0, 1.0]
    assert [item.name for item in tmp_path.iterdir()] == ["reference.safetensors"]


def disk_fills_on_text_write(monkeypatch, at_write: int = 1) -> None:
    """From the ``at_write``-th ``Path.write_text`` on, each writes half its text and fails as a full disk does."""
    real_write_text = Path.write_text
    writes = []

    def write_text(self, text, *args, **kwargs):
        writes.append(self.name)
        if len(writes) < at_write:
            return real_write_text(self, text, *args, **kwargs)
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_midway_through_a_prompt_split_keeps_the_earlier_split(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("".join(f"prompt {number}\n" for number in range(20)))
    source, output = PromptSetConfig(source=str(tmp_path / "prompts.txt")), tmp_path / "split"
    write_prompt_split(source, output, heldout=5, seed=0)
    earlier = {name: (output / name).read_text() for name in ("heldout.txt", "train.txt")}
    disk_fills_on_text_write(monkeypatch, at_write=2)  # heldout.txt written, train.txt not
    with pytest.raises(OSError, match="No space left"):
        write_prompt_split(source, output, heldout=5, seed=1)
    # Never a new heldout.txt beside the old train.txt, whose prompts would then overlap it.
    assert {path.name: path.read_text() for path in output.iterdir()} == earlier


def test_a_full_disk_leaves_no_truncated_eval_report_or_run_config(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_report, "write_sample_views", lambda *arguments: {})
    disk_fills_on_text_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        eval_report.write_report(
            tmp_path, header={"model": "m"}, prompts=["a"], seeds=[0], results=[], base_samples=None,
            aligned_samples=None, confidence=0.95, grid_prompts=0, save_samples=False,
        )
    with pytest.raises(OSError, match="No space left"):
        save_config(RunConfig(), tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == []  # neither a report.json nor a config.yaml a reader takes for whole


def test_a_seppo_bank_file_is_whole_or_absent(tmp_path, monkeypatch):
    monkeypatch.setattr("diffalign.files.save_file", half_written_save)
    bank = CheckpointBank(2, directory=str(tmp_path / "bank"))
    with pytest.raises(OSError, match="No space left"):
        bank.add(1, {"weight": torch.ones(2)})
    assert list((tmp_path / "bank").iterdir()) == []


class BestModelRecipe(RegressionRecipe):
    """Its evaluation improves every time, so each evaluation rewrites ``best/``; export ``fail_at`` hits a full
    disk after writing part of its folder."""

    selection_metric = "score"

    def __init__(self, output_dir: Path, fail_at: int) -> None:
        super().__init__(output_dir)
        self.exports, self.fail_at = 0, fail_at

    def evaluate(self, model, step):
        return {"score": float(step)}

    def save_final(self, model, output_dir):
        self.exports += 1
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "export.txt").write_text(str(self.exports))
        if self.exports == self.fail_at:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fail_at", [2, 3])  # the second best/, the final/
def test_a_failed_model_folder_write_keeps_the_earlier_best_and_leaves_nothing_half_written(tmp_path, fail_at):
    recipe = BestModelRecipe(tmp_path, fail_at)
    with pytest.raises(OSError, match="No space left"):
        fit(loop_config(tmp_path, eval_every=2, max_steps=6), recipe)
    assert (tmp_path / "best" / "export.txt").read_text() == str(fail_at - 1)
    assert not (tmp_path / "final").exists()
    assert not [item.name for item in tmp_path.iterdir() if item.name.startswith(".")]  # no staging left


def test_a_model_folder_set_aside_by_a_killed_write_is_restored(tmp_path):
    # A kill between moving the old best/ aside and renaming the new one in leaves only the old copy.
    (tmp_path / ".best.previous").mkdir()
    (tmp_path / ".best.previous" / "export.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"), folder_written_whole(tmp_path / "best"):
        raise OSError(28, "No space left on device")
    assert (tmp_path / "best" / "export.txt").read_text() == "old"
    assert [item.name for item in tmp_path.iterdir()] == ["best"]


def test_a_failed_toy_rebuild_leaves_the_earlier_toy_whole(tmp_path, monkeypatch):
    class InterruptedBuild:
        @staticmethod
        def build(output_dir: Path, seed: int) -> None:
            (output_dir / "model_index.json").write_text('{"_class_name": ')
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "interrupted_toy_build", InterruptedBuild)
    monkeypatch.setitem(toy_main.TOYS, "t2i", ("interrupted_toy_build", "toy-t2i"))
    (tmp_path / "toy-t2i").mkdir()
    (tmp_path / "toy-t2i" / "model_index.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        toy_main.build_toy("t2i", tmp_path, seed=0)
    assert [path.name for path in tmp_path.iterdir()] == ["toy-t2i"]
    assert (tmp_path / "toy-t2i" / "model_index.json").read_text() == "{}"


def test_resuming_under_a_changed_config_is_refused_unless_allowed_and_then_recorded(tmp_path):
    fit(loop_config(tmp_path, max_steps=3))
    changed = loop_config(tmp_path, resume="latest", batch_size=8)
    with pytest.raises(ConfigError, match=r"run.batch_size × processes: 4 -> 8.*run.allow_config_change: true"):
        fit(changed)
    # The run's length, paths and cadences may change freely.
    fit(loop_config(tmp_path, resume="latest", max_steps=4, log_every=2, checkpoint_every=4))

    allowed = loop_config(tmp_path, resume="latest", max_steps=5, batch_size=8, allow_config_change=True)
    fit(allowed)
    (record,) = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"] == {"run.batch_size × processes": {"checkpoint": 4, "now": 8}}
    assert record["checkpoint"].endswith("step-0000004")
    stored = (tmp_path / "checkpoints" / "step-0000004" / "config.yaml").read_text()
    assert "batch_size: 4" in stored and "batch_size: 8" in (tmp_path / "config.yaml").read_text()


def test_the_global_batch_may_be_split_over_another_number_of_processes():
    two_processes, one_process = {"run": {"batch_size": 2}}, {"run": {"batch_size": 4}}
    assert config_changes(two_processes, one_process, saved_processes=2, current_processes=1) == {}
    assert config_changes(two_processes, one_process, saved_processes=1, current_processes=1) == {
        "run.batch_size × processes": (2, 4)
    }


def test_outputs_follow_the_umask(tmp_path):
    fit(loop_config(tmp_path, max_steps=3))
    expected = 0o666 & ~current_umask()
    written = [tmp_path / "checkpoints" / "step-0000003" / "trainable.safetensors", tmp_path / "final" / "model.pt"]
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [expected, expected]


# --- LLM data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "assets" / "toy-llm")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


GOOD_ROW = {"prompt": user("a question"), "chosen": assistant("yes"), "rejected": assistant("no")}
LLM_BAD_ROWS = [
    (5, "not an object"),
    (None, "not an object"),
    ({**GOOD_ROW, "prompt": []}, "empty messages"),
    ({**GOOD_ROW, "chosen": [{"role": "assistant", "content": None}]}, "empty messages"),
]


def test_llm_rows_of_the_wrong_kind_are_counted_skips(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [GOOD_ROW, *[row for row, _ in LLM_BAD_ROWS]]))
    items, stats = load_preference_items(LLMDataConfig(path=str(path), bad_rows="skip"), tokenizer)
    assert len(items) == 1 and dict(stats.skipped) == {"not an object": 2, "empty messages": 2}


@pytest.mark.parametrize(("row", "reason"), LLM_BAD_ROWS)
def test_llm_rows_of_the_wrong_kind_are_errors_naming_the_row(tokenizer, tmp_path, row, reason):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl'?, row 2: .*bad_rows: skip"):
        load_preference_items(LLMDataConfig(path=str(path)), tokenizer)


def test_non_utf8_bytes_name_the_file_and_line_in_both_trainers(tokenizer, tmp_path):
    llm = tmp_path / "llm.jsonl"
    llm.write_bytes(json.dumps(GOOD_ROW).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"llm.jsonl, line 2: not UTF-8 text \(byte 16 is 0xe9\)"):
        load_preference_items(LLMDataConfig(path=str(llm)), tokenizer)
    index = tmp_path / "index.jsonl"
    index.write_bytes(b'{"caption": "a", "jpg_0": "a.png", "jpg_1": "b.png"}\n{"caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"index.jsonl, line 2: not UTF-8 text"):
        load_preference_pairs(DiffusionDataConfig(source=str(index), resolution=16))


def test_empty_llm_data_is_named(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl'? holds no rows \(it is empty\)"):
        load_preference_items(LLMDataConfig(path=str(tmp_path / "empty.jsonl")), tokenizer)
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero.parquet is not a readable parquet file"):
        load_preference_items(LLMDataConfig(path=str(tmp_path / "zero.parquet")), tokenizer)


# --- diffusion data -------------------------------------------------------------------------------------------


def test_empty_diffusion_sources_are_named(tmp_path):
    empty = write_parquet(tmp_path / "empty.parquet", {key: [] for key in pick_a_pic_columns(1)})
    with pytest.raises(ValueError, match=rf"data.source: {empty} holds no rows"):
        load_preference_pairs(data_config(empty))
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero.parquet is not a readable parquet file"):
        load_preference_pairs(data_config(tmp_path / "zero.parquet"))
    (tmp_path / "index.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"index.jsonl holds no rows"):
        load_preference_pairs(data_config(tmp_path / "index.jsonl"))


def test_an_empty_file_among_others_is_passed_over(tmp_path):
    write_parquet(tmp_path / "data" / "train-0.parquet", {key: [] for key in pick_a_pic_columns(1)})
    write_parquet(tmp_path / "data" / "train-1.parquet", pick_a_pic_columns(3))
    pairs = load_preference_pairs(data_config(tmp_path / "data"))
    assert len(pairs) == 3 and pairs.location(0).endswith("train-1.parquet, row 1")


def elongated_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_identical_and_extremely_elongated_image_pairs_are_refused_or_counted_skips(tmp_path):
    columns = pick_a_pic_columns(4, labels=[1.0] * 4)
    columns["jpg_1"][1] = columns["jpg_0"][1]
    columns["jpg_0"][2] = elongated_png(3000, 1)  # at 16 pixels a 48000×16 resize; at 1024, 3M×1024
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    with pytest.raises(ValueError, match=r"pairs.parquet, row 2: columns 'jpg_0' and 'jpg_1' hold identical data"):
        load_preference_pairs(data_config(source))
    columns["jpg_1"][1] = image_bytes(7)
    elongated = write_parquet(tmp_path / "elongated.parquet", columns)
    with pytest.raises(ValueError, match=r"row 3: the image is 3000×1 pixels.*data.max_aspect_ratio=4"):
        load_preference_pairs(data_config(elongated))
    pairs = load_preference_pairs(data_config(source, skip_bad_rows=True))
    assert pairs.captions == ["caption 0", "caption 3"]
    assert pairs.stats["skipped_identical_pair"] == 1 and pairs.stats["skipped_extreme_aspect_ratio"] == 1


def wav(seconds: float, frequency: float) -> bytes:
    time = np.arange(round(seconds * 16_000)) / 16_000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def test_a_truncated_wav_is_a_corrupt_audio_skip_not_zero_padding(tmp_path):
    from diffalign.diffusion.audio import AudioDecoder

    truncated = wav(1.0, 440.0)[:9_000]  # the header still declares one second
    rows = [("good", wav(1.0, 300.0), wav(1.0, 500.0)), ("cut", truncated, wav(1.0, 600.0))]
    table = {
        "prompt": [prompt for prompt, _, _ in rows],
        "chosen": [{"bytes": chosen, "path": None} for _, chosen, _ in rows],
        "rejected": [{"bytes": rejected, "path": None} for _, _, rejected in rows],
    }
    pq.write_table(pa.table(table), tmp_path / "audio.parquet")
    settings = dict(caption_column="prompt", image_0_column="chosen", image_1_column="rejected", label_0_column=None)
    decoder = AudioDecoder(sample_rate=16_000, num_samples=16_000)
    with pytest.raises(ValueError, match=r"audio.parquet, row 2: the WAV file is truncated"):
        load_preference_pairs(data_config(tmp_path / "audio.parquet", **settings), decoder)
    pairs = load_preference_pairs(data_config(tmp_path / "audio.parquet", skip_bad_rows=True, **settings), decoder)
    assert pairs.captions == ["good"] and pairs.stats["skipped_corrupt_audio"] == 1


def test_diffusion_rows_are_numbered_from_one(tmp_path):
    columns = pick_a_pic_columns(2)
    columns["caption"][0] = ""
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    with pytest.raises(ValueError, match=r"pairs.parquet, row 1: the caption"):
        load_preference_pairs(data_config(source))
