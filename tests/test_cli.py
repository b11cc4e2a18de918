"""The command line: help that lists each command once and says what picks the trainer, config kinds that carry
their command and entry point, and bad input (a config of the wrong kind, a model that cannot be loaded) reported
in one line with exit code 2."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.config import CONFIG_KINDS, config_class, entry_point, load_config

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "cache", "losses", "demo", "eval", "export", "relabel", "prompts")
RECORDED: list = []


def record_config(config):
    """A stand-in trainer: the registry points ``kind: llm`` here in one test."""
    RECORDED.append(config)
    return {"recorded": 1.0}


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_each_command_once(capsys):
    text = help_text(["--help"], capsys)
    for command in COMMANDS:
        assert len(re.findall(rf"^\s+{command}\s", text, flags=re.MULTILINE)) == 1, (command, text)


def test_bare_diffalign_prints_the_help(capsys):
    assert main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: diffalign")
    assert all(re.search(rf"^\s+{command}\s", captured.out, flags=re.MULTILINE) for command in COMMANDS)
    assert captured.err == ""


def test_train_help_says_that_kind_picks_the_trainer(capsys):
    text = " ".join(help_text(["train", "--help"], capsys).split())
    assert "`kind:` picks the trainer" in text
    for kind in ("diffusion", "llm", "llm_online"):
        assert f"kind: {kind} runs" in text


def test_every_kind_has_an_importable_config_class_command_and_entry_point():
    from diffalign.diffusion.trainer import train as diffusion_train
    from diffalign.eval.run import evaluate
    from diffalign.llm.online import train as llm_online_train
    from diffalign.llm.report import evaluate as evaluate_llm
    from diffalign.llm.trainer import train as llm_train

    assert {kind: entry.command for kind, entry in CONFIG_KINDS.items()} == {
        "diffusion": "train",
        "llm": "train",
        "llm_online": "train",
        "eval": "eval",
        "llm_eval": "eval",
    }
    assert entry_point("diffusion") is diffusion_train
    assert entry_point("llm") is llm_train
    assert entry_point("llm_online") is llm_online_train
    assert entry_point("eval") is evaluate
    assert entry_point("llm_eval") is evaluate_llm
    for kind in CONFIG_KINDS:
        assert dataclasses.is_dataclass(config_class(kind))


def test_train_runs_the_entry_point_its_kind_registers(monkeypatch, capsys):
    monkeypatch.setitem(
        CONFIG_KINDS, "llm", dataclasses.replace(CONFIG_KINDS["llm"], entry_point="test_cli:record_config")
    )
    RECORDED.clear()
    assert main(["train", str(ROOT / "configs" / "toy_llm_dpo.yaml"), "run.max_steps=3"]) == 0
    assert len(RECORDED) == 1 and RECORDED[0].run.max_steps == 3
    assert "recorded: 1.0000" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "config", "runs_with", "takes"),
    [
        ("train", "eval_toy.yaml", "diffalign eval", "diffusion or llm"),
        ("eval", "toy_dpo.yaml", "diffalign train", "eval"),
    ],
)
def test_a_config_of_the_wrong_kind_is_a_one_line_config_error(command, config, runs_with, takes, capsys):
    path = ROOT / "configs" / config
    assert main([command, str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("config error: ")
    assert str(path) in error and runs_with in error and f"`diffalign {command}` takes kind: {takes}" in error


def test_the_wrong_kind_is_refused_before_the_rest_of_the_config_is_checked(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("kind: eval\nmodel: {aligned: ''}\n")  # invalid as an eval config too
    with pytest.raises(ValueError, match="kind: eval is run by `diffalign eval"):
        load_config(path, command="train")


def test_a_model_that_cannot_be_loaded_is_a_one_line_load_error(tmp_path, capsys):
    config = ROOT / "configs" / "toy_llm_dpo.yaml"
    missing = tmp_path / "no-such-model"
    overrides = [f"model.pretrained={missing}", f"run.output_dir={tmp_path / 'out'}", "run.trackers=[]"]
    assert main(["train", str(config), *overrides]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("load error: ")
    assert f"model.pretrained={str(missing)!r}" in error and "no such file or directory" in error


def test_an_incomplete_model_directory_names_the_key_the_value_and_the_fix(tmp_path, capsys):
    directory = tmp_path / "empty-model"
    directory.mkdir()
    config = ROOT / "configs" / "toy_llm_dpo.yaml"
    overrides = [f"model.pretrained={directory}", f"run.output_dir={tmp_path / 'out'}", "run.trackers=[]"]
    assert main(["train", str(config), *overrides]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"model.pretrained={str(directory)!r}: cannot load the tokenizer" in error
    assert "point model.pretrained at a complete tokenizer" in error


def test_prompts_writes_disjoint_train_and_heldout_files_from_a_caption_table(tmp_path, capsys):
    captions = [f"a calm piano piece number {i}" for i in range(10)]
    rows = ["caption,duration", *[f'"{caption}",10' for caption in captions]]
    rows += [
        '"a calm piano piece number 3",10',
        '"two\nlines",10',
        '"",10',
    ]  # a duplicate, a newline, an empty row
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "prompts"
    argv = ["prompts", str(tmp_path / "captions.csv"), str(out), "--column", "caption", "--heldout", "3"]
    assert main(argv) == 0
    train = (out / "train.txt").read_text().splitlines()
    heldout = (out / "heldout.txt").read_text().splitlines()
    assert len(heldout) == 3 and len(train) == 8
    assert sorted(train + heldout) == sorted([*captions, "two lines"])
    first = (train, heldout)
    assert main(argv) == 0  # the split is seeded
    assert (
        (out / "train.txt").read_text().splitlines(),
        (out / "heldout.txt").read_text().splitlines(),
    ) == first
    capsys.readouterr()
    assert main([*argv[:-1], "11"]) == 2
    assert "config error: --heldout 11: the source has 11 distinct prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "anchored"),
    [
        ("flow-grpo", {"model.pretrained", "method.grpo.prompts_file", "eval.prompts_file"}),
        ("dpo", {"model.pretrained", "data.source", "eval.prompts_file"}),
    ],
)
def test_demo_anchors_its_configs_asset_paths_at_the_repository(method, anchored):
    """The demo runs from any directory: every ``assets/`` path of its config becomes an absolute override."""
    import yaml

    from diffalign.demo import DEMO_CONFIGS, repository_paths

    path = ROOT / "configs" / DEMO_CONFIGS[method]
    overrides = repository_paths(yaml.safe_load(path.read_text()))
    assert {override.split("=")[0] for override in overrides} == anchored
    config = load_config(path, overrides)
    assert Path(config.model.pretrained) == ROOT / "assets" / Path(config.model.pretrained).name
    assert Path(config.eval.prompts_file).is_absolute() and Path(config.eval.prompts_file).is_file()
