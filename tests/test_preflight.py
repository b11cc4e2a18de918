"""Checks before any model loads (diffalign/preflight.py) and the progress bars' switch (diffalign/progress.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import pick_a_pic_columns, write_parquet

import diffalign.diffusion.trainer as diffusion_trainer
from diffalign import progress as progress_bars
from diffalign.config import ConfigError, LoadError, load_config
from diffalign.preflight import preflight_diffusion

TOY_DPO = Path(__file__).resolve().parents[1] / "configs" / "toy_dpo.yaml"


def toy_config(tmp_path, *overrides):
    return load_config(
        TOY_DPO, [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    )


def test_a_missing_data_source_stops_training_before_the_model_is_read(tmp_path, monkeypatch):
    def no_model_reads(*args, **kwargs):
        raise AssertionError("the model was read before the data was checked")

    monkeypatch.setattr(diffusion_trainer, "family_class", no_model_reads)
    monkeypatch.setattr(diffusion_trainer, "load_family", no_model_reads)
    config = toy_config(tmp_path, f"data.source={tmp_path / 'pairs.parquet'}")
    with pytest.raises(LoadError, match=r"data.source: file .*pairs\.parquet does not exist"):
        diffusion_trainer.train(config)
    with pytest.raises(LoadError, match=r"data.source: file .*pairs\.parquet does not exist"):
        diffusion_trainer.build_cache(config)


def test_a_missing_column_and_an_unwritable_folder_are_named(tmp_path):
    columns = pick_a_pic_columns(2)
    del columns["jpg_1"]
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    with pytest.raises(ConfigError, match="jpg_1"):
        preflight_diffusion(toy_config(tmp_path, f"data.source={source}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data.cache_dir: .*file/cache is not writable"):
        preflight_diffusion(toy_config(tmp_path, f"data.cache_dir={tmp_path / 'file' / 'cache'}"))
    with pytest.raises(LoadError, match=r"model.vae='/nowhere/vae': no such file or directory"):
        preflight_diffusion(toy_config(tmp_path, "model.vae=/nowhere/vae"))


def test_an_unknown_eval_scorer_is_named_before_the_model_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.reward: 'toy_t2' is not a registered scorer; choose one of \["):
        preflight_diffusion(toy_config(tmp_path, "eval.reward=toy_t2"))
    with pytest.raises(ConfigError, match=r"eval.metrics\[1\]: 'centredness' is not a registered scorer"):
        preflight_diffusion(toy_config(tmp_path, "eval.metrics=[toy_t2i,centredness]"))
    preflight_diffusion(toy_config(tmp_path, "eval.metrics=[toy_t2i_centredness]"))


def test_bars_are_off_when_switched_off_and_when_output_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_bars, "_enabled", True)
    assert progress_bars.progress(range(3), desc="x").disable  # pytest's captured stderr is not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    shown = progress_bars.progress(range(3), desc="x")
    progress_bars.configure_progress(False)
    hidden = progress_bars.progress(range(3), desc="x")
    assert not shown.disable and hidden.disable is True
    assert list(hidden) == [0, 1, 2]
