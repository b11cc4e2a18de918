"""Loading the policy (and its tokenizer), making it trainable, and writing the result."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.config import from_dict
from diffalign.hub import loading
from diffalign.llm.config import LLMModelConfig, LLMTrainConfig
from diffalign.model_card import CardFacts
from diffalign.training.checkpoint_model import CheckpointModel, assign_weights
from diffalign.training.precision import mixed_precision_dtype, upcast_trainable

logger = logging.getLogger("diffalign")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(config: LLMModelConfig, mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights: as configured, or (auto) the mixed-precision dtype on a GPU, else fp32."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if not torch.cuda.is_available():
        return torch.float32
    return mixed_precision_dtype(mixed_precision)


def load_tokenizer(config: LLMModelConfig) -> Any:
    from transformers import AutoTokenizer

    with loading("model.pretrained", config.pretrained, "tokenizer", revision=config.revision):
        tokenizer = AutoTokenizer.from_pretrained(config.pretrained, revision=config.revision)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of {config.pretrained} has neither a pad nor an EOS token; add a pad token to it"
            )
        # Padded positions are masked everywhere, so any id will do; EOS is what TRL uses too.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: LLMModelConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with loading("model.pretrained", config.pretrained, "causal language model", revision=config.revision):
        model = AutoModelForCausalLM.from_pretrained(
            config.pretrained,
            revision=config.revision,
            dtype=dtype,
            attn_implementation=config.attn_implementation,
        )
    if config.share_prompt:
        check_shared_prompt_support(model, config.pretrained)
    if config.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


def check_shared_prompt_support(model: nn.Module, name: str) -> None:
    """``model.share_prompt`` hands the model a custom boolean 4D mask: only SDPA reads it as such (eager
    attention adds the mask to the scores), and a sliding-window layer would ignore its window in it."""
    attention = model.config._attn_implementation
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if attention != "sdpa" or layer_types != {"full_attention"}:
        raise ValueError(
            f"model.share_prompt needs SDPA attention in full-attention layers; model.pretrained={name!r} "
            f"runs {attention} attention with layers {sorted(layer_types)}. Set model.share_prompt: false"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


def make_trainable(model: nn.Module, config: LLMModelConfig, gradient_checkpointing: bool) -> nn.Module:
    """The policy to train: a peft LoRA model, or the model itself in fp32 for a full fine-tune."""
    if config.trainable == "full":
        model = model.float().requires_grad_(True)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, config.lora.peft_config(task_type="CAUSAL_LM"))
        # Low-precision frozen base weights, fp32 LoRA weights (the optimizer's masters).
        upcast_trainable(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so it works with a frozen embedding (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def plain_weights(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under the plain model's parameter names, as a rollout engine loads them.

    A full fine-tune's are its own state. A peft LoRA policy's are its base weights with each active adapter's
    delta ``(alpha / rank)·B·A`` added, in the base weights' dtype. The sum is formed out of place: merging
    into a bf16 base and unmerging again would round the base weights a little at every rollout, and the live
    policy must keep its adapter and its base weights bit for bit.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(policy, PeftModel):
        return dict(policy.state_dict())
    base = policy.get_base_model()
    weights = {
        key.replace(".base_layer.", "."): value
        for key, value in base.state_dict().items()
        if ".lora_" not in key
    }
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            base_weight = module.get_base_layer().weight
            delta = sum(
                module.get_delta_weight(adapter)
                for adapter in module.active_adapters
                if adapter in module.scaling
            )
            weights[f"{name}.weight"] = (base_weight + delta).to(base_weight.dtype)
    return weights


def save_policy(model: nn.Module, tokenizer: Any, config: LLMModelConfig, output_dir: Path) -> None:
    """Write what ``AutoModelForCausalLM.from_pretrained(output_dir)`` loads: the full (merged) model, or the
    LoRA adapter with the base model's path in its ``adapter_config.json`` (loading it needs peft)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.trainable == "lora" and config.save == "merged":
        # The merged weights are formed out of place beside the live policy, which keeps its adapter (the loop
        # may still evaluate it): only the adapted layers get new tensors, where a merged copy of the whole
        # model would double the memory at the end of the run.
        model.get_base_model().save_pretrained(output_dir, state_dict=plain_weights(model))
    else:
        model.save_pretrained(output_dir)
    if config.trainable == "lora" and config.save == "adapter":
        # peft records the base model as loaded; a local directory becomes absolute so the adapter loads anywhere.
        base = Path(config.pretrained)
        if base.is_dir():
            adapter_config = output_dir / "adapter_config.json"
            settings = json.loads(adapter_config.read_text())
            settings["base_model_name_or_path"] = str(base.resolve())
            adapter_config.write_text(json.dumps(settings, indent=2))
    tokenizer.save_pretrained(output_dir)


def policy_card_facts(config: LLMModelConfig) -> CardFacts:
    """How the model card says to load a final folder written by :func:`save_policy`."""
    adapter = config.trainable == "lora" and config.save == "adapter"
    usage = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(FOLDER)"
        + ("  # a LoRA adapter: needs peft, loads the base model it names" if adapter else "")
        + "\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)"
    )
    return CardFacts(library="peft" if adapter else "transformers", pipeline_tag="text-generation", usage=usage)


def load_trained_policy(config: LLMModelConfig, checkpoint: CheckpointModel) -> nn.Module:
    """The policy as training made it (fp32, a LoRA added or all of it) holding the checkpoint's weights."""
    model = make_trainable(load_model(config, torch.float32), config, gradient_checkpointing=False)
    return assign_weights(model, checkpoint.weights, checkpoint.path)


def export_checkpoint(checkpoint: CheckpointModel, output_dir: Path) -> CardFacts:
    """Write an LLM checkpoint's policy into ``output_dir`` as ``final/`` holds it; returns its card facts."""
    config = from_dict(LLMTrainConfig, checkpoint.settings)
    save_policy(load_trained_policy(config.model, checkpoint), load_tokenizer(config.model), config.model, output_dir)
    return policy_card_facts(config.model)
