"""Token-level losses and options of the core against TRL's and the papers' formulas, written out here from
the logits of a tiny fake LM batch (``ld_alpha``, ``use_weighting``, TDPO1/2, SparsePO-style token masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffalign.losses import LossConfig, PairScores, TokenScores, compute_loss

PAIRS, WIDTH, VOCAB, BETA = 3, 7, 11, 0.2
# Completion masks of the 2·PAIRS rows [chosen; rejected]: prompts of 1–2 tokens, then completions of different
# lengths (one left-padded row), so that the shared prefix and the tail of LD-DPO both have tokens.
MASKS = [
    [0, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1],
    [0, 1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1],
    [0, 0, 0, 1, 1, 0, 0],
]


def fake_lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (2 * PAIRS, WIDTH, VOCAB)
    return {
        "policy_logits": (2.0 * torch.randn(shape, generator=generator)).requires_grad_(True),
        "ref_logits": 2.0 * torch.randn(shape, generator=generator),
        "labels": torch.randint(0, VOCAB, (2 * PAIRS, WIDTH), generator=generator),
        "mask": torch.tensor(MASKS, dtype=torch.float32),
    }


def token_scores(batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> PairScores:
    """What the LLM trainer hands the core: per-token log-probs, KL and WPO's log Σp², and their sums."""
    policy_logps = F.log_softmax(batch["policy_logits"], dim=-1)
    ref_logps = F.log_softmax(batch["ref_logits"], dim=-1)
    labels, mask = batch["labels"].unsqueeze(-1), batch["mask"]
    policy = policy_logps.gather(-1, labels).squeeze(-1)
    reference = ref_logps.gather(-1, labels).squeeze(-1)
    kl = (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)
    log_sum_sq = torch.logsumexp(2 * policy_logps, dim=-1).detach()

    def side(rows: slice) -> TokenScores:
        return TokenScores(
            policy=policy[rows],
            mask=mask[rows],
            reference=reference[rows],
            kl=kl[rows],
            log_sum_sq_probs=log_sum_sq[rows],
            weights=None if weights is None else weights[rows],
        )

    sums, ref_sums, lengths = (policy * mask).sum(-1), (reference * mask).sum(-1), mask.sum(-1)
    chosen, rejected = slice(0, PAIRS), slice(PAIRS, None)
    return PairScores(
        policy_chosen=sums[chosen],
        policy_rejected=sums[rejected],
        ref_chosen=ref_sums[chosen],
        ref_rejected=ref_sums[rejected],
        chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected],
        chosen_tokens=side(chosen),
        rejected_tokens=side(rejected),
    )


def trl_dpo_loss(batch, loss_type: str, ld_alpha: float | None, use_weighting: bool) -> torch.Tensor:
    """TRL DPOTrainer._compute_loss (huggingface/trl f2cd577) for one loss type, written out: selective
    log-softmax, masked per-token log-probs, LD-DPO's shared/tail split, WPO's weights from the logits."""
    logits, mask = batch["policy_logits"], batch["mask"]
    labels = batch["labels"]

    def sequence_logps(per_token_logps):
        per_token_logps = per_token_logps.masked_fill(mask == 0, 0.0)
        if ld_alpha is None:
            return per_token_logps.sum(1)
        comp_pos = mask.cumsum(dim=1)
        chosen_lens, rejected_lens = mask.sum(dim=1).long().chunk(2)
        shared_lens = torch.minimum(chosen_lens, rejected_lens).repeat(2)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
        tail_mask = comp_pos > shared_lens.unsqueeze(1)
        return (per_token_logps * shared_mask).sum(1) + ld_alpha * (per_token_logps * tail_mask).sum(1)

    per_token_logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_per_token_logps = (
        torch.log_softmax(batch["ref_logits"], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    )
    chosen_logps, rejected_logps = sequence_logps(per_token_logps).chunk(2)
    ref_chosen_logps, ref_rejected_logps = sequence_logps(ref_per_token_logps).chunk(2)
    chosen_scores, rejected_scores = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(BETA * (chosen_scores - rejected_scores))
    else:  # ipo, normalised by the completion lengths
        chosen_mask, rejected_mask = mask.chunk(2)
        delta = chosen_scores / chosen_mask.sum(1).clamp(min=1.0) - rejected_scores / rejected_mask.sum(
            1
        ).clamp(min=1.0)
        per_sequence_loss = (delta - 1 / (2 * BETA)) ** 2
    if use_weighting:
        completion_lengths = mask.sum(dim=1).clamp_min(1)
        with torch.no_grad():
            log_denom = torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * torch.logsumexp(logits, dim=-1)
            aligned_logps = (per_token_logps - log_denom) * mask
        weights = torch.exp(aligned_logps.sum(dim=1) / completion_lengths)
        chosen_weights, rejected_weights = weights.chunk(2)
        per_sequence_loss = per_sequence_loss * chosen_weights * rejected_weights
    return per_sequence_loss.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize(
    ("ld_alpha", "use_weighting"), [(0.5, False), (0.0, False), (None, True), (0.3, True)]
)
def test_ld_alpha_and_use_weighting_match_trls_dpo_trainer(loss_type, ld_alpha, use_weighting):
    batch = fake_lm_batch()
    config = LossConfig(type=[loss_type], beta=BETA, ld_alpha=ld_alpha, use_weighting=use_weighting)
    ours = compute_loss(token_scores(batch), config).loss
    expected = trl_dpo_loss(batch, loss_type, ld_alpha, use_weighting)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    (ours_grad,) = torch.autograd.grad(ours, batch["policy_logits"])
    (expected_grad,) = torch.autograd.grad(expected, batch["policy_logits"])
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-7)
    # The options change the loss: LD-DPO's rows have tails, WPO's weights are not 1.
    plain = compute_loss(token_scores(batch), LossConfig(type=[loss_type], beta=BETA)).loss
    assert abs(plain.item() - ours.item()) > 1e-4


def test_ld_alpha_one_is_plain_dpo_and_spares_the_sft_term():
    """α = 1 weighs the tail like the shared prefix; sft reads the plain NLL whatever ld_alpha is, as TRL's
    `sft` term reads the logits."""
    batch = fake_lm_batch(1)
    plain = compute_loss(token_scores(batch), LossConfig(type=["sigmoid", "sft"], beta=BETA))
    ld_one = compute_loss(token_scores(batch), LossConfig(type=["sigmoid", "sft"], beta=BETA, ld_alpha=1.0))
    torch.testing.assert_close(ld_one.per_pair, plain.per_pair)
    ld_half = compute_loss(token_scores(batch), LossConfig(type=["sigmoid", "sft"], beta=BETA, ld_alpha=0.5))
    torch.testing.assert_close(ld_half.metrics["loss/sft"], plain.metrics["loss/sft"])
    assert not torch.allclose(ld_half.metrics["loss/sigmoid"], plain.metrics["loss/sigmoid"])


def official_tdpo(batch, alpha: float | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Vance0124/Token-level-Direct-Preference-Optimization, trainers.py (_tdpo_get_batch_logps, tdpo_loss),
    written out; ``weights`` are SparsePO-style token masks multiplying each token's log-ratio and KL."""
    mask = batch["mask"] if weights is None else batch["mask"] * weights
    vocab_logps = batch["policy_logits"].log_softmax(-1)
    reference_vocab_ps = batch["ref_logits"].softmax(-1)
    reference_vocab_logps = reference_vocab_ps.log()
    per_position_kl = (reference_vocab_ps * (reference_vocab_logps - vocab_logps)).sum(-1)
    labels = batch["labels"].unsqueeze(2)
    per_token_logps = torch.gather(vocab_logps, dim=2, index=labels).squeeze(2)
    per_reference_token_logps = torch.gather(reference_vocab_logps, dim=2, index=labels).squeeze(2)
    logps_margin = ((per_token_logps - per_reference_token_logps) * mask).sum(-1)
    position_kl = (per_position_kl * mask).sum(-1)
    chosen_margin, rejected_margin = logps_margin.chunk(2)
    chosen_kl, rejected_kl = position_kl.chunk(2)
    margin = chosen_margin - rejected_margin
    if alpha is None:
        logits = margin - (rejected_kl - chosen_kl)
    else:
        logits = margin - alpha * (rejected_kl - chosen_kl.detach())
    return -F.logsigmoid(BETA * logits).mean()


@pytest.mark.parametrize(("name", "alpha"), [("tdpo1", None), ("tdpo2", 0.5), ("tdpo2", 0.2)])
@pytest.mark.parametrize("sparse_masks", [False, True])
def test_tdpo_matches_the_official_code_in_value_and_gradient(name, alpha, sparse_masks):
    batch = fake_lm_batch(2)
    weights = (
        torch.rand((2 * PAIRS, WIDTH), generator=torch.Generator().manual_seed(9)) if sparse_masks else None
    )
    config = LossConfig(type=[name], beta=BETA, tdpo_alpha=alpha if alpha is not None else 0.5)
    ours = compute_loss(token_scores(batch, weights), config).loss
    expected = official_tdpo(batch, alpha, weights)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    (ours_grad,) = torch.autograd.grad(ours, batch["policy_logits"])
    (expected_grad,) = torch.autograd.grad(expected, batch["policy_logits"])
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_tdpo_with_zero_kl_is_dpo():
    """With πθ = πref at every prefix the sequential KLs vanish and TDPO1 is DPO on the same margin."""
    batch = fake_lm_batch(3)
    scores = token_scores(batch)
    for tokens in (scores.chosen_tokens, scores.rejected_tokens):
        tokens.kl = torch.zeros_like(tokens.kl)
    tdpo = compute_loss(scores, LossConfig(type=["tdpo1"], beta=BETA))
    dpo = compute_loss(scores, LossConfig(type=["sigmoid"], beta=BETA))
    torch.testing.assert_close(tdpo.per_pair, dpo.per_pair)


def test_token_level_losses_and_options_refuse_scores_without_tokens():
    scores = PairScores(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.5])
    )
    for config in (
        LossConfig(type=["tdpo1"]),
        LossConfig(type=["sigmoid"], ld_alpha=0.5),
        LossConfig(type=["sigmoid"], use_weighting=True),
    ):
        with pytest.raises(ValueError, match="per-token inputs"):
            compute_loss(scores, config)


def test_token_tensors_must_match_their_side():
    scores = token_scores(fake_lm_batch())
    scores.chosen_tokens.kl = scores.chosen_tokens.kl[:, :-1]
    with pytest.raises(ValueError, match=r"chosen_tokens\.kl has shape"):
        compute_loss(scores, LossConfig(type=["tdpo1"]))


def test_options_are_validated_with_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"loss\.ld_alpha=1\.5 must be in \[0, 1\]"):
        LossConfig(ld_alpha=1.5)
    with pytest.raises(ValueError, match="loss.alphapo_alpha"):
        LossConfig(type=["sigmoid"], alphapo_alpha=0.2)
    with pytest.raises(ValueError, match="unpaired losses"):
        LossConfig(type=["kto"], use_weighting=True)


def test_tdpo_is_finite_for_extreme_logits():
    batch = fake_lm_batch(4)
    batch["policy_logits"] = (200.0 * batch["policy_logits"].detach()).requires_grad_(True)
    out = compute_loss(token_scores(batch), LossConfig(type=["tdpo2"], beta=BETA))
    (grad,) = torch.autograd.grad(out.loss, batch["policy_logits"])
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
