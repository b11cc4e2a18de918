"""The accelerate configs of configs/accelerate/ hold only keys accelerate knows, and the values the trainers need.

accelerate rejects an unknown top-level key (ClusterConfig) but copies the keys of ``fsdp_config`` and
``deepspeed_config`` onto its launch arguments without checking them, so a misspelt nested key would be
silently ignored: here each one must be a launch option. The configs then go through what ``accelerate launch``
does with them (launch arguments → environment → the FSDP/DeepSpeed plugin), which checks their values.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.fsdp import CPUOffloadPolicy

from diffalign.training import OptimConfig, RunConfig
from diffalign.training.engines import check_engine, configure_deepspeed

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def unknown_keys(path: Path) -> list[str]:
    """Keys of an accelerate config that accelerate would reject or silently ignore."""
    try:
        config = ClusterConfig.from_yaml_file(str(path))
    except ValueError as error:  # unknown top-level keys
        return [str(error)]
    launch_options = {action.dest for action in launch_command_parser()._actions}
    nested = [key for key in config.fsdp_config if not key.startswith("fsdp_") or key not in launch_options]
    nested += [key for key in config.deepspeed_config if key not in launch_options]
    return nested


def launch_environment(path: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file path -m diffalign train ...`` gives each process."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "diffalign", "train", "config.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def plugin_for(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> FullyShardedDataParallelPlugin | DeepSpeedPlugin:
    for name, value in launch_environment(path).items():
        monkeypatch.setenv(name, value)
    if ClusterConfig.from_yaml_file(str(path)).distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedPlugin()
    return FullyShardedDataParallelPlugin()


def test_every_engine_has_a_config_and_the_readme_documents_it():
    assert [path.stem for path in CONFIGS] == ["ddp", "fsdp", "zero2", "zero3"]
    readme = (CONFIG_DIR / "README.md").read_text()
    for path in CONFIGS:
        assert f"--config_file configs/accelerate/{path.name} -m diffalign train" in readme
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert flag in readme


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_key_is_one_accelerate_reads(path):
    assert unknown_keys(path) == []
    assert launch_environment(path)["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        (None, "distributed_typ"),
        ("fsdp_config", "fsdp_reshard_after_foward"),
        ("deepspeed_config", "zero_stag"),
    ],
)
def test_a_misspelt_key_is_caught(tmp_path, section, key):
    source = "fsdp" if section != "deepspeed_config" else "zero3"
    config = yaml.safe_load((CONFIG_DIR / f"{source}.yaml").read_text())
    (config if section is None else config[section])[key] = True
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert unknown_keys(path)


def test_fsdp_config_is_fsdp2_full_shard_that_loads_weights_on_every_process(monkeypatch):
    plugin = plugin_for(CONFIG_DIR / "fsdp.yaml", monkeypatch)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # Rank-0-only loading would leave the other processes' frozen reference copies empty.
    assert plugin.cpu_ram_efficient_loading is False
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_leave_batch_accumulation_and_clipping_to_the_run(stage, monkeypatch):
    plugin = plugin_for(CONFIG_DIR / f"zero{stage}.yaml", monkeypatch)
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag is False  # from_pretrained must not partition the frozen models
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key

    # What the loop writes before prepare: the run config's values, and nothing left for accelerate to guess.
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=4,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )
    run = RunConfig(batch_size=3, gradient_accumulation_steps=5)
    configure_deepspeed(accelerator, run, OptimConfig(max_grad_norm=0.5))
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4
    assert config["gradient_clipping"] == 0.5
    configure_deepspeed(accelerator, run, OptimConfig(max_grad_norm=None))
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"


def test_engine_settings_that_break_the_frozen_modules_are_refused(monkeypatch):
    plugin = plugin_for(CONFIG_DIR / "zero3.yaml", monkeypatch)
    plugin.zero3_init_flag = True
    deepspeed = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    with pytest.raises(ValueError, match="zero3_init_flag: false"):
        check_engine(deepspeed)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_engine(fsdp1)
