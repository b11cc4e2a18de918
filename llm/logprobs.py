"""Per-token and per-sequence completion log-probs of a causal LM, without materialising a full log-softmax.

The default path (``completion_logps``) returns summed log-probs. Token-level losses and options of the core
(``ld_alpha``, ``use_weighting``, TDPO) need the per-token values, and TDPO the per-token KL between the
reference's and the policy's next-token distributions: ``completion_token_logps`` keeps what they need, from the
same single forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def selective_log_softmax(logits: Tensor, tokens: Tensor, chunk_rows: int = 4) -> Tensor:
    """``log_softmax(logits)[..., tokens]`` computed as ``logit[token] − logsumexp(logits)``.

    ``logits`` is ``[N, T, V]`` and ``tokens`` ``[N, T]``. A full log-softmax would allocate another
    ``N×T×V`` tensor (gigabytes for a 150k vocabulary); here only ``chunk_rows`` rows are upcast to fp32 at a
    time, so low-precision logits still get an fp32 logsumexp.
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
    logits: Tensor | None = None  # [N, T − 1, V] the model's next-token logits, when kept (TDPO's KL)
    log_sum_sq_probs: Tensor | None = None  # [N, T − 1] log Σ_v p(v)², detached (WPO)

    @property
    def sums(self) -> Tensor:
        return self.token_logps.sum(dim=-1)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=-1)


def log_sum_squared_probs(logits: Tensor, chunk_rows: int = 4) -> Tensor:
    """log Σ_v softmax(logits)_v² = logsumexp(2·logits) − 2·logsumexp(logits), ``[N, T]`` fp32, no gradient."""
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, logits.shape[0], chunk_rows):
            rows = logits[start : start + chunk_rows].float()
            out[start : start + chunk_rows] = torch.logsumexp(2.0 * rows, dim=-1) - 2.0 * torch.logsumexp(
                rows, dim=-1
            )
    return out


def token_kl(reference_logits: Tensor, policy_logits: Tensor, chunk_rows: int = 4) -> Tensor:
    """KL(πref(·|prefix) ‖ πθ(·|prefix)) at every position, ``[N, T]`` fp32, differentiable in the policy's logits.

    Computed a few rows at a time in fp32, so no second full-vocabulary tensor of the batch is kept besides what
    autograd needs.
    """
    rows = []
    for start in range(0, policy_logits.shape[0], chunk_rows):
        reference = torch.log_softmax(reference_logits[start : start + chunk_rows].float(), dim=-1)
        policy = torch.log_softmax(policy_logits[start : start + chunk_rows].float(), dim=-1)
        rows.append((reference.exp() * (reference - policy)).sum(dim=-1))
    return torch.cat(rows)


def _forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits


def completion_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    keep_logits: bool = False,
    with_log_sum_sq_probs: bool = False,
    temperature: float = 1.0,
) -> TokenLogps:
    """Per-token completion log-probs of each row (``TokenLogps``), with the logits (``keep_logits``) and WPO's
    log Σ p² (``with_log_sum_sq_probs``) when asked for.

    Logits at position t predict token t+1, so token t+1 counts when ``completion_mask[t+1]`` is set. With a
    ``temperature`` the log-probs are those of ``softmax(logits / temperature)``, the distribution online
    methods sample from (as TRL's GRPOTrainer scores its completions).
    """
    logits = _forward_logits(model, input_ids, attention_mask)[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    mask = completion_mask[:, 1:].float()
    token_logps = selective_log_softmax(logits, input_ids[:, 1:]) * mask
    return TokenLogps(
        token_logps=token_logps,
        mask=mask,
        logits=logits if keep_logits else None,
        log_sum_sq_probs=log_sum_squared_probs(logits) if with_log_sum_sq_probs else None,
    )


def completion_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's completion tokens, and how many there are (both ``[N]``, fp32)."""
    tokens = completion_token_logps(model, input_ids, attention_mask, completion_mask)
    return tokens.sums, tokens.lengths
