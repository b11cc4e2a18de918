"""Per-token and per-sequence completion log-probs of a causal LM, without materialising its full logits.

Only positions that predict a completion token are scored: the model body gives their final hidden states, and
the output projection (``lm_head``) runs on a chunk of them at a time, in a forward and a backward of its own
(``ChunkedLinearLogProbs``), so neither pass ever holds more than one chunk's ``[positions, vocab]`` logits. The
idea is that of chunked/fused linear cross-entropy (Liger-Kernel, Hsu et al., arXiv 2410.10989; Cut
Cross-Entropy, Wijmans et al., arXiv 2411.09009): the vocabulary-sized logits are a transient of each chunk and
are recomputed in the backward pass rather than stored. The rows go through the model in one of three
layouts (``RowLayout``): padded; packed into one sequence whose position ids restart at every row, which
transformers reads as separate sequences (a block-diagonal mask with SDPA, variable-length kernels with flash
attention), so no compute goes to padding; or grouped by prompt, each prompt run once for all its completions
(``llm/shared_prompt.py``).

The default path (``completion_logps``) returns summed log-probs. Token-level losses and options of the core
(``ld_alpha``, ``use_weighting``, TDPO) need the per-token values, and TDPO the per-token KL between the
reference's and the policy's next-token distributions: ``completion_token_logps`` keeps what they need, from the
same single forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from diffalign.llm.shared_prompt import share_prompts

# Logits elements (fp32) of one chunk of scored positions: 64 MiB, whatever the vocabulary.
CHUNK_ELEMENTS = 2**24


def chunk_positions(vocab_size: int) -> int:
    """How many positions one chunk of the output projection scores."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def selective_log_softmax(logits: Tensor, tokens: Tensor, chunk_rows: int = 4) -> Tensor:
    """``log_softmax(logits)[..., tokens]`` computed as ``logit[token] − logsumexp(logits)``.

    ``logits`` is ``[N, ..., V]`` and ``tokens`` ``[N, ...]``. A full log-softmax would allocate another
    tensor of the logits' size; here only ``chunk_rows`` rows are upcast to fp32 at a time, so low-precision
    logits still get an fp32 logsumexp.
    """
    out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start : start + chunk_rows].float()
        picked = rows.gather(-1, tokens[start : start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        out[start : start + chunk_rows] = picked - torch.logsumexp(rows, dim=-1)
    return out


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left-padded rows get the same positions as right-padded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class TokenLogps:
    """A forward's completion log-probs per token: position t of row n scores token t+1 of that row."""

    token_logps: Tensor  # [N, T − 1] fp32, 0 outside the completion
    mask: Tensor  # [N, T − 1] fp32, 1 on completion tokens
    # [M, V] the model's next-token logits at the M scored positions (``mask``'s ones, row-major), when kept
    # (TDPO's KL)
    logits: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None  # [N, T − 1] log Σ_v p(v)², detached (WPO)

    @property
    def sums(self) -> Tensor:
        return self.token_logps.sum(dim=-1)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=-1)

    def spread(self, values: Tensor) -> Tensor:
        """``[M]`` values of the scored positions laid out as ``[N, T − 1]``, 0 elsewhere."""
        return spread(values, self.mask.bool())


def spread(values: Tensor, mask: Tensor) -> Tensor:
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values)


def log_sum_squared_probs(logits: Tensor) -> Tensor:
    """log Σ_v softmax(logits)_v² = logsumexp(2·logits) − 2·logsumexp(logits), over the last dim, no gradient."""
    with torch.no_grad():
        logits = logits.float()
        return torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * torch.logsumexp(logits, dim=-1)


def token_kl(reference_logits: Tensor, policy_logits: Tensor) -> Tensor:
    """KL(πref(·|prefix) ‖ πθ(·|prefix)) at every scored position (``[M, V]`` logits in, ``[M]`` fp32 out),
    differentiable in the policy's logits.

    Computed a chunk of positions at a time in fp32, so no second full-vocabulary tensor of the batch is kept
    besides what autograd needs.
    """
    rows = []
    step = chunk_positions(policy_logits.shape[-1])
    for start in range(0, policy_logits.shape[0], step):
        reference = torch.log_softmax(reference_logits[start : start + step].float(), dim=-1)
        policy = torch.log_softmax(policy_logits[start : start + step].float(), dim=-1)
        rows.append((reference.exp() * (reference - policy)).sum(dim=-1))
    return torch.cat(rows)


# --- the forward --------------------------------------------------------------------------------------------------


# Config attributes of models whose forward changes the logits after lm_head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder stack and output projection of a transformers causal LM (peft-wrapped or not), or None for a
    model that must run through its own forward: one inside a DDP, FSDP or DeepSpeed wrapper, whose forward
    does the gradient synchronisation or gathers the shards."""
    from peft import PeftModel
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    if isinstance(model, FSDPModule):
        return None
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        return None
    # Gemma's soft-capping and Cohere's and Granite's logit scales act on lm_head's output inside the model's
    # forward: the head alone would give other logits.
    if any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings()
    body = model.get_decoder()
    # The head's weight is used directly (ChunkedLinearLogProbs): a LoRA on lm_head, or hooks that move or
    # gather its weight (accelerate's offloading), need the module's own forward.
    plain_head = type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
    return (body, head) if plain_head and body is not model else None


class ChunkedLinearLogProbs(torch.autograd.Function):
    """``log softmax((h·Wᵀ + b)/τ)[target]`` of each of ``M`` rows, ``step`` rows at a time, forward and backward.

    The forward keeps only the hidden states and each row's log-normaliser; the backward recomputes a chunk's
    logits ``z`` and turns that one buffer into their gradient in place, ``∂ log p_y / ∂z = (onehot(y) −
    softmax(z)) / τ`` times the incoming gradient, before the two products with ``W`` and ``h``. So a chunk's
    backward makes one ``[step, V]`` fp32 tensor where autograd through a recomputed chunk makes several
    (logits, their softmax, the gather's scatter, their sum, ...): the gradient step of fused linear cross-entropy
    (Liger-Kernel, arXiv 2410.10989). Under autocast the backward recomputes in the forward's dtype, as
    ``torch.amp.custom_bwd`` does, so the log-normalisers it reuses are those of the same logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, step: int, with_sq: bool):
        logps = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        log_norm, sq = torch.empty_like(logps), torch.empty_like(logps) if with_sq else logps.new_empty(0)
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            logits = nn.functional.linear(hidden[rows], weight, bias).float().div_(temperature)
            log_norm[rows] = torch.logsumexp(logits, dim=-1)
            logps[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - log_norm[rows]
            if with_sq:
                sq[rows] = log_sum_squared_probs(logits)
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.temperature, ctx.step = temperature, step
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.mark_non_differentiable(sq)
        return logps, sq

    @staticmethod
    def backward(ctx, grad_logps, _grad_sq):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        device, autocast, autocast_dtype = ctx.autocast
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast):
            for start in range(0, hidden.shape[0], ctx.step):
                rows = slice(start, start + ctx.step)
                scale = (grad_logps[rows] / ctx.temperature).unsqueeze(-1)
                logits = nn.functional.linear(hidden[rows], weight, bias).float().div_(ctx.temperature)
                grad_logits = logits.sub_(log_norm[rows].unsqueeze(-1)).exp_().mul_(-scale)
                grad_logits.scatter_add_(-1, targets[rows].unsqueeze(-1), scale)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
                if needs_weight and autocast:
                    grad_weight += grad_logits.T @ hidden[rows].float()  # the product in the autocast dtype
                elif needs_weight:
                    # In place: a product of its own would be a second [V, H] buffer beside the gradient.
                    grad_weight.addmm_(grad_logits.T, hidden[rows].float())
                if needs_bias:
                    grad_bias += grad_logits.sum(dim=0)
        grad_weight = grad_weight.to(weight.dtype) if needs_weight else None
        grad_bias = grad_bias.to(bias.dtype) if needs_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_head_scores(
    head: nn.Linear, hidden: Tensor, targets: Tensor, *, temperature: float = 1.0, with_sq: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``[M]`` log-probs of ``targets`` from ``[M, H]`` hidden states, ``chunk_positions`` rows at a time (and
    WPO's log Σ p², detached, with ``with_sq``); at most one chunk's logits are alive (`ChunkedLinearLogProbs`)."""
    step = chunk_positions(head.weight.shape[0])
    logps, sq = ChunkedLinearLogProbs.apply(hidden, head.weight, head.bias, targets, temperature, step, with_sq)
    return logps, sq if with_sq else None


# How a batch's rows go through the model: as padded rows, packed into one sequence (``model.padding_free``),
# or grouped by prompt so that each prompt runs once (``model.share_prompt``, ``llm/shared_prompt.py``).
RowLayout = Literal["padded", "packed", "shared_prompt"]


def packed_inputs(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The real tokens of every row as one ``[1, L]`` sequence, its position ids (restarting at 0 on each row)
    and, for every padded position ``[N, T]``, its index in the packed sequence (-1 on padding)."""
    real = attention_mask.bool()
    positions = position_ids_from_mask(attention_mask)[real].unsqueeze(0)
    index = torch.where(real.flatten(), real.flatten().long().cumsum(0) - 1, -1).view_as(real)
    return input_ids[real].unsqueeze(0), positions, index


def model_inputs(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, scored: Tensor, layout: RowLayout
) -> tuple[dict[str, Tensor | None], Tensor]:
    """The model's inputs for the rows in ``layout``, and the index of each ``scored`` position ``[N, T]``
    (row-major) in the flattened output sequence. Shared prompts give some positions twice: a prompt's last
    token predicts the first token of each completion."""
    if layout == "packed":
        ids, positions, index = packed_inputs(input_ids, attention_mask)
        mask, keep = None, index[scored]
    elif layout == "shared_prompt":
        shared = share_prompts(input_ids, attention_mask, completion_mask)
        ids, positions, mask = shared.input_ids, shared.position_ids, shared.attention_mask
        keep = shared.index[scored]
    else:
        ids, positions, mask = input_ids, position_ids_from_mask(attention_mask), attention_mask
        keep = scored.flatten().nonzero().squeeze(-1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}, keep


def scored_features(
    model: nn.Module, inputs: dict[str, Tensor | None], keep: Tensor, *, full_logits: bool, ordered: bool
) -> tuple[Tensor, nn.Module | None]:
    """The final hidden states ``[M, H]`` of the output positions ``keep`` and the head to apply to them;
    or, with ``full_logits`` or a model that runs only through its own forward, their logits ``[M, V]`` and
    None. ``ordered``: ``keep`` names each position once, in increasing order (every layout but shared
    prompts)."""
    ids = inputs["input_ids"]
    parts = body_and_head(model)
    if parts is None:
        selected = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        selected[keep] = True
        logits = model(**inputs, logits_to_keep=selected.view_as(ids)).logits
        # The model returns the selected positions once each, in order; shared prompts repeat and reorder.
        return (logits if ordered else logits[selected.long().cumsum(0)[keep] - 1]), None
    body, head = parts
    hidden = body(**inputs).last_hidden_state.flatten(0, 1)[keep]
    return (head(hidden), None) if full_logits else (hidden, head)


def completion_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    keep_logits: bool = False,
    with_log_sum_sq_probs: bool = False,
    temperature: float = 1.0,
    layout: RowLayout = "padded",
) -> TokenLogps:
    """Per-token completion log-probs of each row (``TokenLogps``), with the logits (``keep_logits``) and WPO's
    log Σ p² (``with_log_sum_sq_probs``) when asked for.

    Logits at position t predict token t+1, so token t+1 counts when ``completion_mask[t+1]`` is set. With a
    ``temperature`` the log-probs are those of ``softmax(logits / temperature)``, the distribution online
    methods sample from (as TRL's GRPOTrainer scores its completions). Every ``layout`` gives the padded
    forward's values.
    """
    mask = completion_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    scored = torch.nn.functional.pad(mask, (0, 1))  # [N, T]: the positions that predict a completion token
    targets = input_ids[:, 1:][mask]
    inputs, keep = model_inputs(input_ids, attention_mask, completion_mask, scored, layout)
    ordered = layout != "shared_prompt"
    features, head = scored_features(model, inputs, keep, full_logits=keep_logits, ordered=ordered)
    if head is not None:
        logps, sq = chunked_head_scores(
            head, features, targets, temperature=temperature, with_sq=with_log_sum_sq_probs
        )
        logits = None
    else:
        logits = features / temperature if temperature != 1.0 else features
        logps = selective_log_softmax(logits, targets, chunk_rows=chunk_positions(logits.shape[-1]))
        sq = log_sum_squared_probs(logits) if with_log_sum_sq_probs else None
    return TokenLogps(
        token_logps=spread(logps, mask),
        mask=mask.float(),
        logits=logits if keep_logits else None,
        log_sum_sq_probs=spread(sq, mask) if sq is not None else None,
    )


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    layout: RowLayout = "padded",
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's completion tokens, and how many there are (both ``[N]``, fp32)."""
    tokens = completion_token_logps(model, input_ids, attention_mask, completion_mask, layout=layout)
    return tokens.sums, tokens.lengths
