"""Rows that share a prompt, run with the prompt once (``model.share_prompt``).

A batch of preference pairs repeats every prompt, in the chosen row and in the rejected row; a group of
sampled completions repeats it in every row of the group. Here the rows with the same prompt tokens become one
sequence, the prompt followed by each of their completions, and a 4D attention mask lets every completion
token see the prompt and the completion's own earlier tokens, never another completion. Each completion's
position ids start at the prompt's length, as in its own row. So every completion token has the context and
the position it has in its row and gets the same log-prob, while the prompt goes through the model once per
group instead of once per row. This is the prefix sharing of Wang & Hegde, "Accelerating Direct Preference
Optimization with Prefix Sharing" (arXiv 2410.20305), which builds the same mask as a FlexAttention block
mask; here it is a boolean mask for SDPA, ``[groups, 1, L, L]``.

The grouping is read from the tokens, whatever the order of the rows, so one function serves pairs, KTO's
mismatched rows and sampled groups, and rows whose prompt appears once are simply their own group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SharedPromptLayout:
    """The model inputs of the grouped sequences, and where each token of the original rows went."""

    input_ids: Tensor  # [G, L]
    position_ids: Tensor  # [G, L]
    attention_mask: Tensor  # [G, 1, L, L] bool: query position attends key position
    index: Tensor  # [N, T]: each row position's index in the flattened [G · L] sequences, -1 on padding


def share_prompts(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> SharedPromptLayout:
    """Group the ``[N, T]`` rows by their prompt tokens (the real tokens before the completion) into
    ``SharedPromptLayout``; padding on either side."""
    rows_real = attention_mask.bool().cpu()
    rows_completion = completion_mask.bool().cpu() & rows_real
    rows_ids = input_ids.cpu()
    groups: dict[tuple[int, ...], int] = {}
    sequences: list[list[int]] = []  # token ids of each group's sequence
    positions: list[list[int]] = []
    segments: list[list[int]] = []  # 0 on the prompt, k on the group's k-th completion
    completions: list[int] = []  # how many completions each group has so far
    group_of = torch.zeros(rows_ids.shape, dtype=torch.long)
    offset = torch.full(rows_ids.shape, -1, dtype=torch.long)
    for row in range(rows_ids.shape[0]):
        columns = rows_real[row].nonzero().squeeze(-1)
        completion = rows_completion[row, columns]
        prompt_length = int((~completion).sum())
        if completion[:prompt_length].any():
            raise ValueError(f"row {row}: its completion tokens are not all after its prompt tokens")
        tokens = rows_ids[row, columns].tolist()
        key = tuple(tokens[:prompt_length])
        if key not in groups:
            groups[key] = len(sequences)
            sequences.append(tokens[:prompt_length])
            positions.append(list(range(prompt_length)))
            segments.append([0] * prompt_length)
            completions.append(0)
        group = groups[key]
        completions[group] += 1
        start, completion_length = len(sequences[group]), len(tokens) - prompt_length
        sequences[group] += tokens[prompt_length:]
        positions[group] += range(prompt_length, len(tokens))
        segments[group] += [completions[group]] * completion_length
        group_of[row, columns] = group
        offset[row, columns] = torch.cat(
            [torch.arange(prompt_length), torch.arange(start, start + completion_length)]
        )
    width = max(len(sequence) for sequence in sequences)
    device = input_ids.device

    def padded(values: list[list[int]], fill: int) -> Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long, device=device)

    index = torch.where(offset >= 0, group_of * width + offset, -1)
    return SharedPromptLayout(
        input_ids=padded(sequences, 0),
        position_ids=padded(positions, 0),
        attention_mask=attention_of_segments(padded(segments, -1)),
        index=index.to(device),
    )


def attention_of_segments(segments: Tensor) -> Tensor:
    """``[G, 1, L, L]``: causal, onto real keys (segment ≥ 0) of the prompt (0) or the query's own segment.
    Padding queries (-1) see every earlier real key, so that no row of the mask is empty (SDPA would give
    NaN)."""
    query, key = segments.unsqueeze(-1), segments.unsqueeze(-2)
    width = segments.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    visible = (key == 0) | (key == query) | (query < 0)
    return (causal & visible & (key >= 0)).unsqueeze(1)
