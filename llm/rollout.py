"""Rollouts: G sampled completions per prompt, with transformers' ``generate``, each from its own seed.

``generate`` samples every row of a batch from the one global generator, so a row's completion would depend on
which rows share its batch. Here each row has a generator of its own and sampling is the Gumbel-max trick
inside ``generate``'s greedy search: with temperature, top-k and top-p applied to the next-token logits as
transformers' warpers do, ``argmax(logits + g)`` with ``g = −log(−log u)`` and ``u ~ U(0, 1)`` drawn from the
row's generator is an exact sample of ``softmax(logits)``. A completion then depends only on its prompt and
its seed, so resumed, accumulated and multi-process runs generate the same completions.

A backend turns prompts and seeds into completion token ids (``CompletionSampler``): this one, the default, on
any device, or a colocated vLLM engine on GPUs (``llm/vllm_sampler.py``); ``build_sampler`` picks it from
``rollout.backend``. Old log-probs are recomputed by the training model in either case, so a backend only has
to sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from diffalign.llm.batching import pad

if TYPE_CHECKING:
    from diffalign.llm.online_config import LLMOnlineTrainConfig


class CompletionSampler(Protocol):
    def sample(self, model: nn.Module, prompt_ids: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """One completion per prompt (token ids, ending with EOS unless cut at the length limit)."""
        ...


class SeededGumbelSampling(LogitsProcessor):
    """Adds Gumbel noise from one generator per row to the (already warped) scores; ``argmax`` then samples."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        uniform = torch.stack(
            [
                torch.rand(scores.shape[-1], generator=generator, device=scores.device)
                for generator in self.generators
            ]
        )
        # u = 0 would give an infinite draw; the smallest positive float keeps every draw finite.
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
        return scores.float() + gumbel


class TemperatureScaling(LogitsProcessor):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores / self.temperature


class TransformersSampler:
    """Sampling with ``model.generate`` on left-padded prompts, ``batch_size`` rows per call."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        batch_size: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # The order of transformers' own sampling: temperature, then top-k, then top-p.
        self.warpers: list[LogitsProcessor] = [TemperatureScaling(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt_ids: list[list[int]], seeds: list[int]) -> list[list[int]]:
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"one seed per prompt is needed, got {len(seeds)} for {len(prompt_ids)} prompts")
        completions = []
        for start in range(0, len(prompt_ids), self.batch_size):
            completions += self._sample_batch(
                model, prompt_ids[start : start + self.batch_size], seeds[start : start + self.batch_size]
            )
        return completions

    def _sample_batch(
        self, model: nn.Module, prompt_ids: list[list[int]], seeds: list[int]
    ) -> list[list[int]]:
        device = next(model.parameters()).device
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        input_ids = pad(prompt_ids, self.tokenizer.pad_token_id, "left").to(device)
        attention_mask = pad([[1] * len(ids) for ids in prompt_ids], 0, "left").to(device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,  # greedy over Gumbel-perturbed scores: a seeded sample per row
            logits_processor=LogitsProcessorList([*self.warpers, SeededGumbelSampling(generators)]),
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [
            cut_at_eos(row, self.tokenizer.eos_token_id) for row in output[:, input_ids.shape[1] :].tolist()
        ]


def cut_at_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """The completion up to and including its first EOS (the padding ``generate`` adds after it removed)."""
    return token_ids[: token_ids.index(eos_token_id) + 1] if eos_token_id in token_ids else token_ids


def build_sampler(config: LLMOnlineTrainConfig, tokenizer: Any, dtype: torch.dtype) -> CompletionSampler:
    """The sampler of ``config.rollout.backend``."""
    rollout = config.rollout
    sampling = dict(
        max_new_tokens=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
    )
    if rollout.backend == "transformers":
        return TransformersSampler(tokenizer, batch_size=rollout.batch_size, **sampling)
    from diffalign.llm.vllm_sampler import VLLMSampler, start_engine

    prompt_length = config.data.max_prompt_length
    engine, sampling_params = start_engine(
        config.model.pretrained,
        revision=config.model.revision,
        dtype=dtype,
        seed=config.run.seed,
        gpu_memory_utilization=rollout.vllm.gpu_memory_utilization,
        max_model_len=rollout.vllm.max_model_len
        or (prompt_length + rollout.max_new_tokens if prompt_length is not None else None),
        enforce_eager=rollout.vllm.enforce_eager,
    )
    return VLLMSampler(engine, sampling_params, eos_token_id=tokenizer.eos_token_id, **sampling)
