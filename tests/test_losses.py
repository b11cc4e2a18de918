"""compute_loss, the DPO sigmoid loss and the SFT term, checked against formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.losses import LOSSES, LossConfig, PairScores, compute_loss, list_losses


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


POLICY_CHOSEN = [-12.0, -30.5, -7.25, -50.0]
POLICY_REJECTED = [-14.0, -29.0, -9.0, -48.5]
REF_CHOSEN = [-12.5, -30.0, -8.0, -49.0]
REF_REJECTED = [-13.0, -30.0, -8.5, -49.5]


def make_scores(**overrides) -> PairScores:
    fields = dict(
        policy_chosen=torch.tensor(POLICY_CHOSEN),
        policy_rejected=torch.tensor(POLICY_REJECTED),
        ref_chosen=torch.tensor(REF_CHOSEN),
        ref_rejected=torch.tensor(REF_REJECTED),
    )
    fields.update(overrides)
    return PairScores(**fields)


def expected_margins() -> list[float]:
    return [
        (pc - rc) - (pr - rr)
        for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, strict=True)
    ]


def test_sigmoid_matches_dpo_formula():
    beta = 0.3
    out = compute_loss(make_scores(), LossConfig(type=["sigmoid"], beta=beta))
    expected = [-log_sigmoid(beta * m) for m in expected_margins()]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_sigmoid_label_smoothing_is_cdpo():
    beta, epsilon = 0.5, 0.2
    out = compute_loss(make_scores(), LossConfig(type=["sigmoid"], beta=beta, label_smoothing=epsilon))
    expected = [
        -(1 - epsilon) * log_sigmoid(beta * m) - epsilon * log_sigmoid(-beta * m) for m in expected_margins()
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)


def test_sigmoid_soft_labels():
    beta = 0.5
    labels = [1.0, 0.0, 0.5, 0.8]
    out = compute_loss(make_scores(label=torch.tensor(labels)), LossConfig(type=["sigmoid"], beta=beta))
    expected = [
        -(p * log_sigmoid(beta * m) + (1 - p) * log_sigmoid(-beta * m))
        for p, m in zip(labels, expected_margins(), strict=True)
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)


def test_soft_label_one_half_has_zero_gradient_at_zero_margin():
    policy = torch.tensor([-3.0, -8.0], requires_grad=True)
    scores = PairScores(
        policy_chosen=policy,
        policy_rejected=torch.tensor([-3.0, -8.0]),
        ref_chosen=torch.tensor([-1.0, -2.0]),
        ref_rejected=torch.tensor([-1.0, -2.0]),
        label=torch.tensor([0.5, 0.5]),
    )
    compute_loss(scores, LossConfig(type=["sigmoid"], beta=2.0)).loss.backward()
    assert torch.equal(policy.grad, torch.zeros(2))


def test_diffusion_dpo_loss_matches_official_formula():
    """Scores −½·MSE with β=5000 give the official Diffusion-DPO loss −log σ(−½β((Lθw−Lrw)−(Lθl−Lrl)))."""
    generator = torch.Generator().manual_seed(0)
    ref_mse_chosen = 0.1 + 0.1 * torch.rand(16, generator=generator)
    ref_mse_rejected = 0.1 + 0.1 * torch.rand(16, generator=generator)
    model_mse_chosen = ref_mse_chosen + 1e-4 * torch.randn(16, generator=generator)
    model_mse_rejected = ref_mse_rejected + 1e-4 * torch.randn(16, generator=generator)
    beta = 5000.0

    out = compute_loss(
        PairScores(
            policy_chosen=-0.5 * model_mse_chosen,
            policy_rejected=-0.5 * model_mse_rejected,
            ref_chosen=-0.5 * ref_mse_chosen,
            ref_rejected=-0.5 * ref_mse_rejected,
        ),
        LossConfig(type=["sigmoid"], beta=beta),
    )

    # The official train.py: model_diff = Lθw − Lθl, ref_diff = Lrw − Lrl, inside = −½β(model_diff − ref_diff).
    expected = []
    for lw, ll, rw, rl in zip(
        model_mse_chosen.double().tolist(),
        model_mse_rejected.double().tolist(),
        ref_mse_chosen.double().tolist(),
        ref_mse_rejected.double().tolist(),
        strict=True,
    ):
        inside = -0.5 * beta * ((lw - ll) - (rw - rl))
        expected.append(-log_sigmoid(inside))
    assert max(abs(a - b) for a, b in zip(out.per_pair.tolist(), expected, strict=True)) < 1e-6
    assert abs(out.loss.item() - sum(expected) / len(expected)) < 1e-6
    # The official implicit accuracy is the fraction of pairs with inside > 0.
    official_accuracy = (
        sum(
            (-0.5 * beta * ((lw - ll) - (rw - rl))) > 0
            for lw, ll, rw, rl in zip(
                model_mse_chosen.tolist(),
                model_mse_rejected.tolist(),
                ref_mse_chosen.tolist(),
                ref_mse_rejected.tolist(),
                strict=True,
            )
        )
        / 16
    )
    assert out.metrics["reward_accuracy"].item() == pytest.approx(official_accuracy)


def test_sft_token_mean_and_raw():
    lengths = torch.tensor([4.0, 10.0, 2.0, 25.0])
    with_lengths = compute_loss(
        make_scores(chosen_lengths=lengths, rejected_lengths=lengths), LossConfig(type=["sft"])
    )
    expected = [-pc / n for pc, n in zip(POLICY_CHOSEN, lengths.tolist(), strict=True)]
    np.testing.assert_allclose(with_lengths.per_pair.numpy(), expected, rtol=1e-6)

    raw = compute_loss(make_scores(ref_chosen=None, ref_rejected=None), LossConfig(type=["sft"]))
    np.testing.assert_allclose(raw.per_pair.numpy(), [-pc for pc in POLICY_CHOSEN], rtol=1e-6)


def test_sft_on_diffusion_scores_is_half_mse():
    mse = torch.tensor([0.12, 0.18])
    out = compute_loss(
        PairScores(policy_chosen=-0.5 * mse, policy_rejected=-0.5 * mse), LossConfig(type=["sft"])
    )
    np.testing.assert_allclose(out.per_pair.numpy(), [0.06, 0.09], rtol=1e-6)


def test_weighted_combination_and_pair_weights():
    beta, sft_weight = 0.2, 0.005
    pair_weight = [1.0, 0.0, 2.0, 0.5]
    out = compute_loss(
        make_scores(weight=torch.tensor(pair_weight)),
        LossConfig(type=["sigmoid", "sft"], weights=[1.0, sft_weight], beta=beta),
    )
    per_pair = [
        -log_sigmoid(beta * m) + sft_weight * -pc
        for m, pc in zip(expected_margins(), POLICY_CHOSEN, strict=True)
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), per_pair, rtol=1e-6)
    assert out.loss.item() == pytest.approx(
        sum(w * x for w, x in zip(pair_weight, per_pair, strict=True)) / 4
    )
    sigmoid_term = (
        sum(w * -log_sigmoid(beta * m) for w, m in zip(pair_weight, expected_margins(), strict=True)) / 4
    )
    assert out.metrics["loss/sigmoid"].item() == pytest.approx(sigmoid_term, rel=1e-6)


def test_rewards_and_metrics():
    beta = 0.1
    out = compute_loss(make_scores(), LossConfig(type=["sigmoid"], beta=beta))
    chosen = [beta * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)]
    rejected = [beta * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED, strict=True)]
    np.testing.assert_allclose(out.chosen_rewards.numpy(), chosen, rtol=1e-6)
    np.testing.assert_allclose(out.rejected_rewards.numpy(), rejected, rtol=1e-6)
    assert not out.chosen_rewards.requires_grad
    metrics = {k: v.item() for k, v in out.metrics.items()}
    assert metrics["reward_accuracy"] == pytest.approx(
        np.mean([c > r for c, r in zip(chosen, rejected, strict=True)])
    )
    assert metrics["reward_margin"] == pytest.approx(np.mean(chosen) - np.mean(rejected), abs=1e-6)
    assert metrics["chosen_reward"] == pytest.approx(np.mean(chosen), abs=1e-6)
    assert metrics["rejected_reward"] == pytest.approx(np.mean(rejected), abs=1e-6)
    assert metrics["policy_chosen"] == pytest.approx(np.mean(POLICY_CHOSEN))
    assert metrics["policy_rejected"] == pytest.approx(np.mean(POLICY_REJECTED))


def test_reference_free_rewards_use_policy():
    out = compute_loss(make_scores(ref_chosen=None, ref_rejected=None), LossConfig(type=["sft"], beta=2.0))
    np.testing.assert_allclose(out.chosen_rewards.numpy(), [2.0 * p for p in POLICY_CHOSEN])


def test_bf16_inputs_compute_in_fp32_and_backpropagate():
    policy = torch.tensor(POLICY_CHOSEN, dtype=torch.bfloat16, requires_grad=True)
    scores = make_scores(
        policy_chosen=policy,
        policy_rejected=torch.tensor(POLICY_REJECTED, dtype=torch.bfloat16),
        ref_chosen=torch.tensor(REF_CHOSEN, dtype=torch.bfloat16),
        ref_rejected=torch.tensor(REF_REJECTED, dtype=torch.bfloat16),
    )
    out = compute_loss(scores, LossConfig(type=["sigmoid", "sft"]))
    assert out.loss.dtype == torch.float32 and out.per_pair.dtype == torch.float32
    out.loss.backward()
    assert policy.grad is not None and torch.isfinite(policy.grad.float()).all()
    # More chosen likelihood lowers both terms.
    assert (policy.grad < 0).all()


def test_unknown_loss_name_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown loss name.*'nope'.*sigmoid"):
        LossConfig(type=["sigmoid", "nope"])


def test_weights_length_must_match():
    with pytest.raises(ValueError, match=r"loss.weights=\[1.0\] has 1 entries but loss.type"):
        LossConfig(type=["sigmoid", "sft"], weights=[1.0])


def test_missing_reference_names_the_loss_and_the_fix():
    with pytest.raises(ValueError, match=r"loss 'sigmoid' needs reference scores.*reference-free loss"):
        compute_loss(make_scores(ref_chosen=None, ref_rejected=None), LossConfig(type=["sigmoid"]))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="paired but got 4 chosen and 3 rejected"):
        compute_loss(make_scores(policy_rejected=torch.zeros(3), ref_rejected=torch.zeros(3)), LossConfig())
    with pytest.raises(ValueError, match=r"label.*must be in \[0, 1\]"):
        compute_loss(make_scores(label=torch.tensor([0.0, 1.0, 1.5, 0.5])), LossConfig())
    with pytest.raises(ValueError, match="label is set but no loss"):
        compute_loss(make_scores(label=torch.full((4,), 0.5)), LossConfig(type=["sft"]))
    with pytest.raises(ValueError, match="only one of ref_chosen / ref_rejected"):
        compute_loss(make_scores(ref_rejected=None), LossConfig())
    with pytest.raises(ValueError, match=r"weight has shape \(3,\)"):
        compute_loss(make_scores(weight=torch.ones(3)), LossConfig())
    with pytest.raises(ValueError, match="1-D float tensor"):
        compute_loss(make_scores(policy_chosen=torch.zeros(4, 2)), LossConfig())
    with pytest.raises(ValueError, match=r"loss\.beta=0"):
        LossConfig(beta=0)


def test_list_losses_describes_every_registered_loss():
    listed = dict(list_losses())
    assert set(listed) == set(LOSSES)
    assert {"sigmoid", "sft"} <= set(listed)
    assert all(description and "\n" not in description for description in listed.values())
