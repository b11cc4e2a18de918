"""The config loader: types, overrides and errors that name the key, the value and what is allowed."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from diffalign.config import ConfigError, apply_override, from_dict, load_config
from diffalign.losses import LossConfig
from diffalign.training.config import OptimConfig, RunConfig


@dataclass
class Section:
    rate: float = 1.0
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)
    path: str | None = None


@dataclass
class Root:
    kind: str = "test"
    section: Section = field(default_factory=Section)


def test_values_are_converted_and_checked():
    config = from_dict(Root, {"section": {"rate": "1e-5", "steps": 7, "mode": "b", "names": "x", "path": None}})
    assert config.section.rate == pytest.approx(1e-5)
    assert config.section.steps == 7
    assert config.section.names == ["x"]  # a scalar where a list is expected becomes a one-item list
    assert config.section.path is None


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"section": {"mode": "c"}}, ["section.mode", "'c'", "['a', 'b']"]),
        ({"section": {"steps": 1.5}}, ["section.steps", "integer", "1.5"]),
        ({"section": {"speed": 1}}, ["section.speed", "allowed keys", "rate"]),
        ({"section": {"rate": "fast"}}, ["section.rate", "number", "fast"]),
        ({"section": 3}, ["section", "mapping"]),
    ],
)
def test_errors_name_key_value_and_allowed(data, fragments):
    with pytest.raises(ConfigError) as error:
        from_dict(Root, data)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_post_init_checks_are_reported_with_their_section():
    with pytest.raises(ConfigError, match=r"optim.*lr must be > 0"):
        from_dict(OptimConfig, {"lr": -1.0}, prefix="optim.")
    with pytest.raises(ConfigError, match="run.trackers"):
        from_dict(RunConfig, {"trackers": ["neptune"]})


def test_dotted_overrides_parse_yaml_values():
    raw = {"optim": {"lr": 1.0}}
    apply_override(raw, "optim.lr=1e-5")
    apply_override(raw, "loss.type=[sigmoid, sft]")
    apply_override(raw, "run.resume=null")
    assert raw == {"optim": {"lr": "1e-5"}, "loss": {"type": ["sigmoid", "sft"]}, "run": {"resume": None}}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(raw, "optim.lr")


def test_loss_section_accepts_a_single_type():
    assert from_dict(LossConfig, {"type": "ipo", "beta": 0.5}).type == ["ipo"]


def test_load_config_fails_before_any_model_loads(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: diffusion\nrun:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "run.max_step" in str(error.value) and "max_steps" in str(error.value) and str(path) in str(error.value)
    path.write_text("kind: painting\n")
    with pytest.raises(ConfigError, match="'painting'.*diffusion"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
