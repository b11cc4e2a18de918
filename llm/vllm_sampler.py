"""Rollouts with a vLLM engine colocated with training (``rollout.backend: vllm``), for GPUs.

Each training process starts an engine of its own, inside that process and on its GPU, which it shares with
training: TRL's ``vllm_mode="colocate"``, set up as TRL sets it up (vLLM's ``external_launcher`` executor with
tensor parallelism 1, the launcher's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, engine steps in-process). Before
every rollout the engine loads the policy's current weights (``llm.model.plain_weights``: a LoRA policy's
adapters merged out of place) and drops its prefix cache, whose keys and values the old weights computed.

Each completion is one request with the row's derived seed, so its random draws do not depend on the other
rows; the two backends draw different samples from the same distribution. vLLM's kernels are not
batch-invariant unless ``VLLM_BATCH_INVARIANT=1``, so the logits, and rarely a sampled token, can differ with
the batch a request shares: a resumed run is exact with the transformers backend, and close with this one.
Generation stops at the tokenizer's EOS only (``ignore_eos`` with ``stop_token_ids=[eos]``: the extra stop
tokens of a model's ``generation_config`` do not apply, as in the transformers backend), and the EOS is kept in
the completion. Old log-probs are recomputed by the training model, so the engine only samples.

Written against vLLM 0.34's ``LLM`` API (``generate`` on token-id prompts, ``apply_model``,
``reset_prefix_cache``; request seeds are int64). vLLM is an extra (``pip install "diffalign[vllm]"``) that
pins its own torch and transformers versions; it runs on CUDA GPUs only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from torch import nn

from diffalign.config import ConfigError
from diffalign.llm.model import plain_weights

# vLLM keeps request seeds in an int64 array; the derived seeds are unsigned 64-bit.
SEED_MASK = 2**63 - 1


class VLLMSampler:
    """``CompletionSampler`` over a vLLM ``LLM`` engine and its ``SamplingParams`` class."""

    def __init__(
        self,
        engine: Any,
        sampling_params: Callable[..., Any],
        *,
        eos_token_id: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
    ) -> None:
        self.engine = engine
        self.sampling_params = sampling_params
        self.settings = dict(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,  # 0 is off in vLLM too
            ignore_eos=True,
            stop_token_ids=[eos_token_id],
            detokenize=False,  # the trainer decodes the completions it scores
        )

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt_ids: list[list[int]], seeds: list[int]) -> list[list[int]]:
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"one seed per prompt is needed, got {len(seeds)} for {len(prompt_ids)} prompts")
        self.load_weights(model)
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        params = [self.sampling_params(seed=seed & SEED_MASK, **self.settings) for seed in seeds]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def load_weights(self, model: nn.Module) -> None:
        """The policy's current weights into the engine's model, and its prefix cache emptied."""
        weights = plain_weights(model)
        self.engine.apply_model(lambda engine_model: engine_model.load_weights(weights.items()))
        self.engine.reset_prefix_cache()


def require_vllm(accelerator: Accelerator) -> None:
    """Before any model loads: the vllm package, a CUDA GPU and whole weights on every process are there, or
    a one-line error says what to do."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.backend: vllm needs the vllm package, which is not installed: pip install 'diffalign[vllm]' "
            "(in an environment of its own: vLLM pins its torch version), or use rollout.backend: transformers"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "rollout.backend: vllm runs on CUDA GPUs only and none is visible; use rollout.backend: transformers"
        )
    distributed = accelerator.distributed_type
    if distributed == DistributedType.FSDP or (
        distributed == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        raise ConfigError(
            "rollout.backend: vllm loads the whole policy into its engine before every rollout, but under FSDP "
            "or ZeRO-3 each process holds a shard of it; launch with DDP, ZeRO-1/2 or one process, or use "
            "rollout.backend: transformers"
        )


def start_engine(
    pretrained: str,
    *,
    revision: str | None,
    dtype: torch.dtype,
    seed: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    enforce_eager: bool,
) -> tuple[Any, Callable[..., Any]]:
    """A colocated vLLM engine of ``pretrained`` on this process's GPU, and vLLM's ``SamplingParams``."""
    import vllm

    # The external launcher runs the engine in this process; vLLM refuses it with engine multiprocessing on.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # A run started without a launcher is one process; accelerate/torchrun set these for every process.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29512")
    engine = vllm.LLM(
        model=pretrained,
        revision=revision,
        dtype=str(dtype).removeprefix("torch."),
        seed=seed,
        tensor_parallel_size=1,
        distributed_executor_backend="external_launcher",
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
    )
    return engine, vllm.SamplingParams
