"""Per-token and per-sequence completion log-probs of a causal LM, without materialising a full log-softmax."""

from __future__ import annotations

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


def completion_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each row's completion tokens, and how many there are (both ``[N]``, fp32).

    Logits at position t predict token t+1, so token t+1 counts when ``completion_mask[t+1]`` is set.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    token_logps = selective_log_softmax(logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)
