"""Every shipped config loads with the loader of the command that runs it, and names registered scorers."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffalign.config import load_config
from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.eval.relabel import RelabelConfig, load_relabel_config
from diffalign.rewards import scorer_names

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_configs_folder_is_found():
    assert len(CONFIGS) >= 20
    assert {"toy_music_dpo.yaml", "toy_music_dragon.yaml"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_loads(path: Path):
    raw = yaml.safe_load(path.read_text())
    if "kind" in raw:  # diffalign train / diffalign eval
        config = load_config(path)
    else:  # diffalign relabel, the one command whose config has no kind
        config = load_relabel_config(str(path), [])
        assert isinstance(config, RelabelConfig)
    if isinstance(config, DiffusionTrainConfig):
        # Scorer names are plain strings in the training config; a typo would only fail once a model is loaded.
        if config.method.name == "dragon":
            assert config.method.dragon.reward in scorer_names(), path
        if config.eval.reward is not None:
            assert config.eval.reward in scorer_names(), path


OVERRIDE = re.compile(r"^\w+(\.\w+)+=.*$", re.DOTALL)


def documented_overrides(path: Path) -> list[list[str]]:
    """Override sets a config documents in its comments: consecutive comment lines made only of ``key=value``."""
    variants: list[list[str]] = []
    previous_was_override = False
    for line in path.read_text().splitlines():
        text = line[1:].strip() if line.startswith("#") else ""
        tokens = shlex.split(text) if OVERRIDE.match(text) else []  # prose may hold unpaired quotes
        is_override = bool(tokens) and all(OVERRIDE.match(token) for token in tokens)
        if is_override:
            if previous_was_override:
                variants[-1] += tokens
            else:
                variants.append(tokens)
        previous_was_override = is_override
    return variants


DOCUMENTED = [(path, overrides) for path in CONFIGS for overrides in documented_overrides(path)]


def test_music_dragon_configs_document_each_reward_kind():
    variants = {path.name: [] for path in CONFIGS}
    for path, overrides in DOCUMENTED:
        variants[path.name].append(dict(token.split("=", 1) for token in overrides))
    # Per-song FAD, full-set FAD, Vendi and text exemplars on top of the CLAP score the config itself uses.
    kinds = {(v.get("method.dragon.reward"), v.get("method.dragon.reward_options.reduction")) for v in variants["musicldm_dragon.yaml"]}
    assert {("fad", "per_sample"), ("fad", "leave_one_out"), ("vendi", "leave_one_out")} <= kinds
    assert {"fad", "clap_score"} <= {v["method.dragon.reward"] for v in variants["toy_music_dragon.yaml"]}
    assert variants["musicldm_tangoflux_crpo.yaml"]


@pytest.mark.parametrize(
    "path, overrides", DOCUMENTED, ids=[f"{path.name}:{' '.join(o)[:60]}" for path, o in DOCUMENTED]
)
def test_documented_overrides_load(path: Path, overrides: list[str]):
    config = load_config(path, overrides)
    assert config.method.dragon.reward in scorer_names()
