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
        if config.method.name == "grpo":
            assert {term.name for term in config.method.grpo.rewards} <= set(scorer_names()), path
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
    if isinstance(config, DiffusionTrainConfig) and config.method.name == "dragon":
        assert config.method.dragon.reward in scorer_names()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_KEYS = {"pretrained", "vae", "base", "source", "path", "model", "processor", "reward_model"}
HUB_ID_RECORD = Path(__file__).resolve().parents[1] / "configs" / "models" / "README.md"


def config_hub_ids(node, key: str = "") -> set[str]:
    """Values of keys that take a model or dataset which are hub ids rather than local paths."""
    if isinstance(node, dict):
        return set().union(*(config_hub_ids(value, name) for name, value in node.items()))
    if isinstance(node, list):
        return set().union(*(config_hub_ids(value, key) for value in node))
    if key in HUB_KEYS and isinstance(node, str) and HUB_ID.match(node) and not Path(node).exists():
        return {node}
    return set()


def default_hub_ids() -> set[str]:
    """Hub repositories scorers and prompt presets load when not told otherwise."""
    import inspect

    from diffalign.eval.prompts import PROMPT_PRESETS
    from diffalign.rewards.registry import _SCORERS

    ids = {preset.repo_id for preset in PROMPT_PRESETS.values()}
    for factory in _SCORERS.values():
        for name, parameter in inspect.signature(factory).parameters.items():
            default = parameter.default
            if name in ("model", "processor", "checkpoint") and isinstance(default, str) and "/" in default:
                ids.add("/".join(default.split("/")[:2]))
    return ids


def test_every_hub_id_we_name_is_recorded_with_its_source():
    recorded = HUB_ID_RECORD.read_text()
    named = set().union(*(config_hub_ids(yaml.safe_load(path.read_text())) for path in CONFIGS)) | default_hub_ids()
    assert {"stable-diffusion-v1-5/stable-diffusion-v1-5", "yuvalkirstain/PickScore_v1"} <= named
    missing = sorted(hub_id for hub_id in named if f"`{hub_id}`" not in recorded)
    assert not missing, f"record these in {HUB_ID_RECORD} with where they come from: {missing}"


def test_no_config_names_a_deleted_hub_repository():
    deleted = ("runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1")
    for path in CONFIGS:
        for hub_id in deleted:
            assert hub_id not in path.read_text(), (path.name, hub_id)
