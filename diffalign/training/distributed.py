"""The global batch of a data-parallel step: what the losses that couple samples need from the other processes.

Most losses are a mean of per-pair terms, so each process can compute its own shard's loss and the gradient
all-reduce (DDP, FSDP, DeepSpeed: a mean over processes) gives the gradient of the global batch. Two quantities
are not like that:

- batch-level losses (AOT sorts the scores of the batch, ``LossSpec.batch_level``): one pair's loss depends on
  every other pair's score, so the sort must see every process's pairs;
- KTO's reference point z0 (an estimate of KL(πθ‖πref) averaged over the batch): a mean over every process's
  samples, detached; likewise GRPO's advantages when they are normalised over the batch.

Both trainers call these helpers, so that N processes with a per-process batch B train exactly like one process
with a batch N·B (tests/test_distributed.py). The loss core stays pure: it is handed the global batch's scores.
The sort spans one micro-batch of every process, not an accumulation window (that would need every micro-batch's
scores before the first backward).
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes
from torch import Tensor

from diffalign.losses import LOSSES, LossConfig, LossOutput, PairScores, compute_loss
from diffalign.losses.core import SCALAR_FIELDS


class _ScaleGradient(torch.autograd.Function):
    """Identity on the way forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, values: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def _gather_rows(values: Tensor) -> list[Tensor]:
    """Every process's ``values`` (detached), in process order; the sizes along dim 0 may differ."""
    sizes = gather(torch.tensor([values.shape[0]], device=values.device)).tolist()
    # all_gather needs one shape everywhere: pad to the largest shard, then cut each shard back.
    padded = gather(pad_across_processes(values.detach().contiguous(), dim=0))
    width = max(sizes)
    return [padded[rank * width : rank * width + size] for rank, size in enumerate(sizes)]


def gather_across_processes(values: Tensor) -> Tensor:
    """Every process's ``values`` concatenated along dim 0 in process order (the order of the global batch).

    Only this process's rows carry a gradient, multiplied by the number of processes. Every process then
    computes the same global loss L, and each one's backward gives N·∂L/∂(its rows)·∂(its rows)/∂θ; the
    gradient all-reduce averages those N terms into Σ_p ∂L/∂(rows of p)·∂(rows of p)/∂θ = ∂L/∂θ, the
    single-process gradient of the global batch. (torch.distributed.nn's differentiable all_gather gives the
    same gradient through a reduce-scatter in the backward; this needs no collective in the backward.)
    """
    state = PartialState()
    if state.num_processes == 1:
        return values
    shards = _gather_rows(values)
    shards[state.process_index] = _ScaleGradient.apply(values, float(state.num_processes))
    return torch.cat(shards)


def global_rows(values: Tensor) -> tuple[Tensor, slice]:
    """Every process's ``values`` (detached) concatenated in process order, and where this process's rows lie in
    it: e.g. rewards, whose batch statistics (GRPO's advantages over the batch) span the global batch."""
    state = PartialState()
    if state.num_processes == 1:
        return values.detach(), slice(0, values.shape[0])
    shards = _gather_rows(values)
    start = sum(shard.shape[0] for shard in shards[: state.process_index])
    return torch.cat(shards), slice(start, start + values.shape[0])


def mean_over_processes(values: Tensor) -> Tensor:
    """The mean of ``values`` over every process's entries (detached); e.g. KTO's batch estimate of z0."""
    if PartialState().num_processes == 1:
        return values.detach().mean()
    return torch.cat(_gather_rows(values)).mean()


def gather_pair_scores(scores: PairScores) -> PairScores:
    """The global batch's scores: every per-sample field gathered across processes (``kl_reference_point`` and
    ``margin_baseline``, already global scalars, are kept)."""
    if scores.has_tokens:
        raise ValueError(
            "a batch-level loss (aot, aot_unpaired, beta_dpo) with per-token inputs (ld_alpha, use_weighting, "
            "tdpo) is not supported across processes; drop one of them or train on one process"
        )
    updates = {
        field.name: gather_across_processes(value)
        for field in dataclasses.fields(scores)
        if (value := getattr(scores, field.name)) is not None and field.name not in SCALAR_FIELDS
    }
    return dataclasses.replace(scores, **updates)


def compute_loss_on_global_batch(scores: PairScores, config: LossConfig) -> LossOutput:
    """``compute_loss``, with the scores of every process when a configured loss is batch-level (AOT).

    Per-pair losses need no gather (the gradient all-reduce already averages them), so they skip the
    collectives. With a gather, the loss, rewards and metrics are those of the global batch on every process.
    """
    if PartialState().num_processes > 1 and any(LOSSES[name].batch_level for name in config.type):
        scores = gather_pair_scores(scores)
    return compute_loss(scores, config)
