"""The vLLM rollout backend without vLLM: the weights it hands the engine (a LoRA policy merged out of place) give
the policy's own logits, and the online trainer, given an engine that samples as the transformers backend does,
syncs the policy's current weights before every rollout and asks for each row's seed, EOS stop and limits.
The real engine needs a CUDA GPU and the vllm extra, neither of which CI has; its errors here are the ones a user
without them gets."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import DistributedType
from helpers import TOY_LLM, quiet_run
from peft import LoraConfig, get_peft_model
from tiny_pipelines import build_tiny_llm
from transformers import AutoModelForCausalLM, AutoTokenizer

import diffalign.llm.vllm_sampler as vllm_sampler
from diffalign.config import ConfigError, from_dict
from diffalign.llm.model import plain_weights
from diffalign.llm.online import SAMPLING_STREAM, OnlineLLMRecipe, train
from diffalign.llm.online_config import LLMOnlineTrainConfig
from diffalign.llm.rollout import TransformersSampler
from diffalign.training import make_accelerator
from diffalign.training.seeding import derived_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_policy(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter.float()) * 0.2)
    return policy.eval()


def test_a_lora_policys_plain_weights_give_its_logits_and_leave_it_untouched(tmp_path):
    directory = build_tiny_llm(tmp_path / "llm")
    policy = lora_policy(directory)
    before = {name: value.clone() for name, value in policy.state_dict().items()}

    weights = plain_weights(policy)

    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    plain.load_state_dict(weights, strict=True)  # every name the plain model has, and no other
    input_ids = torch.tensor([[5, 17, 3, 42, 8, 11]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, policy(input_ids).logits, atol=1e-5, rtol=0)
    # W + (alpha / r)·B·A, written out for one adapted layer; an unadapted one is the base weight.
    q_proj = policy.base_model.model.model.layers[1].self_attn.q_proj
    expected = q_proj.base_layer.weight + (8 / 4) * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight
    torch.testing.assert_close(weights["model.layers.1.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=0)
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.weight"], plain.model.layers[0].self_attn.k_proj.weight)
    for name, value in policy.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_merged_weights_keep_a_bf16_base_in_bf16(tmp_path):
    policy = lora_policy(build_tiny_llm(tmp_path / "llm"), dtype=torch.bfloat16)
    weights = plain_weights(policy)
    q_proj = policy.base_model.model.model.layers[0].self_attn.q_proj
    delta = 2.0 * q_proj.lora_B["default"].weight.float() @ q_proj.lora_A["default"].weight.float()
    merged_weight = weights["model.layers.0.self_attn.q_proj.weight"]
    assert merged_weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged_weight, (q_proj.base_layer.weight.float() + delta).bfloat16(), atol=0, rtol=0)


def test_a_full_policys_plain_weights_are_its_state(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llm(tmp_path / "llm"))
    weights = plain_weights(model)
    assert weights.keys() == model.state_dict().keys()
    assert all(weights[name] is value or torch.equal(weights[name], value) for name, value in model.state_dict().items())


class TransformersBackedEngine:
    """vLLM's ``LLM`` surface the sampler uses, over a transformers model: ``apply_model`` hands it the model,
    whose ``load_weights`` loads a full state strictly, and ``generate`` samples each request with its own seed."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(TOY_LLM).eval()
        self.model.load_weights = lambda items: self.model.load_state_dict(dict(items), strict=True)
        self.calls: list[str] = []
        self.params: list[SimpleNamespace] = []

    def apply_model(self, function: Any) -> list[Any]:
        self.calls.append("load")
        return [function(self.model)]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset")

    def generate(self, requests: list[dict], params: list[SimpleNamespace], use_tqdm: bool) -> list[Any]:
        self.calls.append("generate")
        self.params += params
        outputs = []
        for request, param in zip(requests, params, strict=True):
            sampler = TransformersSampler(
                self.tokenizer,
                max_new_tokens=param.max_tokens,
                temperature=param.temperature,
                top_p=param.top_p,
                top_k=param.top_k,
                batch_size=1,
            )
            completion = sampler.sample(self.model, [request["prompt_token_ids"]], [param.seed])[0]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=completion)]))
        return outputs


def vllm_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[OnlineLLMRecipe, TransformersBackedEngine]:
    """The online trainer with ``rollout.backend: vllm``, its engine the one above."""
    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    engine = TransformersBackedEngine(tokenizer)
    started: dict[str, Any] = {}

    def start_engine(pretrained: str, **settings: Any) -> tuple[Any, Any]:
        started.update(settings, pretrained=pretrained)
        return engine, SimpleNamespace

    monkeypatch.setattr(vllm_sampler, "start_engine", start_engine)
    raw = {
        "kind": "llm_online",
        "model": {"pretrained": str(TOY_LLM), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"path": str(TOY_LLM / "data" / "prompts_train.jsonl"), "max_rows": 8, "max_prompt_length": 40},
        "rollout": {"backend": "vllm", "group_size": 2, "max_new_tokens": 16, "temperature": 0.9, "top_k": 20},
        "rewards": [{"function": "diffalign.toy.llm:toy_reward"}],
        "run": quiet_run(tmp_path, max_steps=1, batch_size=2, checkpoint_every=100),
    }
    config = from_dict(LLMOnlineTrainConfig, raw)
    recipe = OnlineLLMRecipe(config, make_accelerator(config.run))
    assert started == {
        "pretrained": str(TOY_LLM),
        "revision": None,
        "dtype": torch.float32,
        "seed": config.run.seed,
        "gpu_memory_utilization": 0.3,
        "max_model_len": 40 + 16,
        "enforce_eager": False,
    }
    return recipe, engine


def test_every_rollout_samples_from_the_policys_current_weights(tmp_path, monkeypatch):
    recipe, engine = vllm_recipe(tmp_path, monkeypatch)
    tokenizer = recipe.tokenizer
    batch = recipe.collate([0, 1])
    batch["sample_ids"] = [0, 1]
    visits = [(s, g) for s in (0, 1) for g in range(2)]
    seeds = [derived_seed(recipe.config.run.seed, SAMPLING_STREAM, s, g) & vllm_sampler.SEED_MASK for s, g in visits]
    prompts = [ids for ids in batch["prompt_ids"] for _ in range(2)]
    policy_sampler = TransformersSampler(
        tokenizer, max_new_tokens=16, temperature=0.9, top_p=1.0, top_k=20, batch_size=4
    )

    for update in range(2):
        if update:  # an optimizer step's worth of change: the engine must see it at the next rollout
            with torch.no_grad():
                for name, parameter in recipe.model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(0.0, 0.3)
        rollout = recipe.collect(recipe.model, batch)
        completions = [
            row[mask].tolist() for row, mask in zip(rollout.input_ids, rollout.completion_mask.bool(), strict=True)
        ]
        assert completions == policy_sampler.sample(recipe.model, prompts, seeds)

    assert engine.calls == ["load", "reset", "generate"] * 2
    assert [param.seed for param in engine.params] == seeds * 2
    for param in engine.params:
        assert param.ignore_eos and param.stop_token_ids == [tokenizer.eos_token_id] and not param.detokenize
        assert (param.max_tokens, param.temperature, param.top_p, param.top_k) == (16, 0.9, 1.0, 20)


def pretend_vllm_is_installed(monkeypatch: pytest.MonkeyPatch, installed: bool = True) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        if name == "vllm":
            return object() if installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


ONE_PROCESS = SimpleNamespace(distributed_type=DistributedType.NO)


def test_without_the_vllm_package_training_says_how_to_get_it_before_any_model_loads(tmp_path, monkeypatch):
    pretend_vllm_is_installed(monkeypatch, installed=False)
    with pytest.raises(ConfigError, match=r"rollout.backend: vllm needs the vllm package.*diffalign\[vllm\]"):
        vllm_sampler.require_vllm(ONE_PROCESS)
    # The policy named does not exist: the run must stop at the backend's check, before it would load it.
    raw = {
        "kind": "llm_online",
        "model": {"pretrained": str(tmp_path / "no-such-model")},
        "data": {"path": str(TOY_LLM / "data" / "prompts_train.jsonl")},
        "rollout": {"backend": "vllm"},
        "rewards": [{"function": "diffalign.toy.llm:toy_reward"}],
        "run": quiet_run(tmp_path / "out", max_steps=1),
    }
    with pytest.raises(ConfigError, match="needs the vllm package"):
        train(from_dict(LLMOnlineTrainConfig, raw))


def test_without_a_gpu_or_with_sharded_weights_the_engine_is_refused(monkeypatch):
    pretend_vllm_is_installed(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runs on CUDA GPUs only.*rollout.backend: transformers"):
        vllm_sampler.require_vllm(ONE_PROCESS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    vllm_sampler.require_vllm(ONE_PROCESS)
    with pytest.raises(ConfigError, match="under FSDP or ZeRO-3 each process holds a shard"):
        vllm_sampler.require_vllm(SimpleNamespace(distributed_type=DistributedType.FSDP))
    zero = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace())
    zero.state.deepspeed_plugin = SimpleNamespace(zero_stage=2)
    vllm_sampler.require_vllm(zero)
    zero.state.deepspeed_plugin.zero_stage = 3
    with pytest.raises(ConfigError, match="launch with DDP, ZeRO-1/2 or one process"):
        vllm_sampler.require_vllm(zero)


def test_a_bad_engine_memory_share_is_refused(tmp_path):
    raw = {
        "kind": "llm_online",
        "rewards": [{"function": "diffalign.toy.llm:toy_reward"}],
        "rollout": {"vllm": {"gpu_memory_utilization": 1.5}},
    }
    with pytest.raises(ConfigError, match=r"rollout.vllm.gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        from_dict(LLMOnlineTrainConfig, raw)
