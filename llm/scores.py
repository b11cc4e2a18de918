"""The core's pair inputs from a batch of ``[chosen rows; rejected rows]``: summed completion log-probs of policy
and reference with lengths, and the per-token values when a configured loss or option needs them.

The offline trainer scores its preference pairs with it, online DPO the best and worst completion of each
sampled group.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from diffalign.llm.logprobs import RowLayout, completion_logps, completion_token_logps, token_kl
from diffalign.llm.reference import ModelReference
from diffalign.losses import PairScores, TokenScores

ROW_KEYS = ("input_ids", "attention_mask", "completion_mask")

# A model's reference log-probs (summed, or per token with ``tokens``), or a function reading the precomputed
# summed ones a batch carries.
Reference = ModelReference | Callable[[dict[str, Tensor]], Tensor]


def select_rows(batch: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    return {key: batch[key][rows] for key in ROW_KEYS}


def paired_scores(
    model: nn.Module,
    batch: dict[str, Tensor],
    num_pairs: int,
    reference: Reference | None,
    token_inputs: set[str],
    *,
    layout: RowLayout = "padded",
) -> PairScores:
    """``PairScores`` of the batch's ``2·num_pairs`` rows, chosen first; ``token_inputs`` is
    ``LossConfig.needed_inputs()``; ``layout`` is how the policy's rows go through it (``model.layout``)."""
    if "token_logps" in token_inputs:
        return token_pair_scores(model, batch, num_pairs, reference, token_inputs, layout=layout)
    reference_logps = reference(batch) if reference is not None else None
    logps, lengths = completion_logps(model, **select_rows(batch, slice(None)), layout=layout)
    chosen, rejected = slice(0, num_pairs), slice(num_pairs, None)
    return PairScores(
        policy_chosen=logps[chosen],
        policy_rejected=logps[rejected],
        ref_chosen=reference_logps[chosen] if reference_logps is not None else None,
        ref_rejected=reference_logps[rejected] if reference_logps is not None else None,
        chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected],
    )


def token_pair_scores(
    model: nn.Module,
    batch: dict[str, Tensor],
    num_pairs: int,
    reference: Reference | None,
    token_inputs: set[str],
    *,
    layout: RowLayout = "padded",
) -> PairScores:
    """Paired scores with per-token inputs: the policy's (and the reference's) per-token log-probs, with the
    per-token KL between them for TDPO and WPO's log Σ p² when configured. ``reference`` must then be a model
    reference (``ModelReference.tokens``)."""
    rows = select_rows(batch, slice(None))
    with_kl = "token_kl" in token_inputs
    policy = completion_token_logps(
        model,
        **rows,
        keep_logits=with_kl,
        with_log_sum_sq_probs="token_vocab" in token_inputs,
        layout=layout,
    )
    reference_tokens = reference.tokens(rows, keep_logits=with_kl) if reference is not None else None
    kl = policy.spread(token_kl(reference_tokens.logits, policy.logits)) if with_kl else None

    def side(part: slice) -> TokenScores:
        return TokenScores(
            policy=policy.token_logps[part],
            mask=policy.mask[part],
            reference=reference_tokens.token_logps[part] if reference_tokens is not None else None,
            kl=kl[part] if kl is not None else None,
            log_sum_sq_probs=policy.log_sum_sq_probs[part] if policy.log_sum_sq_probs is not None else None,
        )

    chosen, rejected = slice(0, num_pairs), slice(num_pairs, None)
    sums, lengths = policy.sums, policy.lengths
    return PairScores(
        policy_chosen=sums[chosen],
        policy_rejected=sums[rejected],
        ref_chosen=reference_tokens.sums[chosen] if reference_tokens is not None else None,
        ref_rejected=reference_tokens.sums[rejected] if reference_tokens is not None else None,
        chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected],
        chosen_tokens=side(chosen),
        rejected_tokens=side(rejected),
    )
