"""Numerical robustness and symmetry properties of every registered loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffalign.losses import LOSSES, LossConfig, PairScores, compute_loss

# Losses on sequence scores alone (the token-level ones have their own tests in test_losses_token_level.py).
ALL_LOSSES = sorted(name for name, spec in LOSSES.items() if not spec.needs_token_kl)
# Losses whose value never rises when the chosen (resp. rejected) log-likelihood rises (resp. falls).
# The others aim at a target (squared losses, EXO's KL to 1 − ε, NCA's and APO-down's chosen anchor, Cal-DPO's
# calibration) or, like DiscoPOP, are non-monotone near a zero margin by design.
NOT_MONOTONE_IN_CHOSEN = {"ipo", "sppo_hard", "exo_pair", "discopop", "nca_pair", "apo_down", "cal_dpo"}
NOT_MONOTONE_IN_REJECTED = {"ipo", "sppo_hard", "exo_pair", "discopop", "cal_dpo"}
F_DIVERGENCE_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.uses_f_divergence)
# β-DPO is batch-level through one batch mean, which a permutation keeps: its losses follow the pairs too.
PER_PAIR_LOSSES = sorted(name for name in ALL_LOSSES if name not in ("aot", "aot_unpaired"))


def config_for(name: str, **overrides) -> LossConfig:
    fields = dict(type=[name], beta=0.1, label_smoothing=1e-3 if name == "exo_pair" else 0.0)
    fields.update(overrides)
    return LossConfig(**fields)


def leaf(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).requires_grad_(True)


def run_with_grads(name: str, values: dict[str, list[float]], dtype=torch.float32, **config_overrides):
    tensors = {key: leaf(v, dtype) for key, v in values.items()}
    lengths = torch.tensor([7.0] * len(values["policy_chosen"]))
    scores = PairScores(**tensors, chosen_lengths=lengths, rejected_lengths=lengths)
    out = compute_loss(scores, config_for(name, **config_overrides))
    out.loss.backward()
    grads = {
        key: tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        for key, tensor in tensors.items()
    }
    return out, grads


EXTREME = {
    "policy_chosen": [1000.0, -1000.0, 0.0, -1000.0, 1000.0],
    "policy_rejected": [-1000.0, 1000.0, -1000.0, 0.0, 1000.0],
    "ref_chosen": [-1000.0, 1000.0, 0.0, 1000.0, -1000.0],
    "ref_rejected": [1000.0, -1000.0, 1000.0, -1000.0, -1000.0],
}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extreme_log_probs_give_finite_loss_and_right_signed_gradients(name):
    out, grads = run_with_grads(name, EXTREME)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_pair).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    if name not in NOT_MONOTONE_IN_CHOSEN:
        assert (grads["policy_chosen"] <= 0).all()
    if name not in NOT_MONOTONE_IN_REJECTED:
        assert (grads["policy_rejected"] >= 0).all()


@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_stay_finite_for_extreme_log_ratios(name, divergence):
    # TRL's old stability check used log-ratios of about ±1000; these reach ±2000.
    out, grads = run_with_grads(name, EXTREME, f_divergence=divergence)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_pair).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def diffusion_scores(model_gap: float) -> dict[str, list[float]]:
    """−½·MSE scores: reference MSE 0.1–0.2, the policy's off by ``model_gap`` (1e-4 typical, 1.0 diverged)."""
    generator = torch.Generator().manual_seed(1)
    ref_chosen = 0.1 + 0.1 * torch.rand(6, generator=generator)
    ref_rejected = 0.1 + 0.1 * torch.rand(6, generator=generator)
    model_chosen = ref_chosen + model_gap * torch.randn(6, generator=generator).abs()
    model_rejected = ref_rejected - 0.5 * model_gap * torch.rand(6, generator=generator)
    return {
        "policy_chosen": (-0.5 * model_chosen).tolist(),
        "policy_rejected": (-0.5 * model_rejected).tolist(),
        "ref_chosen": (-0.5 * ref_chosen).tolist(),
        "ref_rejected": (-0.5 * ref_rejected).tolist(),
    }


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("model_gap", [1e-4, 1.0])
def test_diffusion_scale_errors_with_beta_5000(name, model_gap):
    out, grads = run_with_grads(name, diffusion_scores(model_gap), beta=5000.0)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_pair).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    if name not in NOT_MONOTONE_IN_CHOSEN:
        assert (grads["policy_chosen"] <= 0).all()
    if name not in NOT_MONOTONE_IN_REJECTED:
        assert (grads["policy_rejected"] >= 0).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bf16_inputs_give_the_fp32_result_of_the_rounded_inputs(name):
    values = {
        "policy_chosen": [-12.0, -30.5, -7.25, -50.0],
        "policy_rejected": [-14.0, -29.0, -9.0, -48.5],
        "ref_chosen": [-12.5, -30.0, -8.0, -49.0],
        "ref_rejected": [-13.0, -30.0, -8.5, -49.5],
    }
    bf16_out, bf16_grads = run_with_grads(name, values, dtype=torch.bfloat16)
    rounded = {k: torch.tensor(v, dtype=torch.bfloat16).float().tolist() for k, v in values.items()}
    fp32_out, fp32_grads = run_with_grads(name, rounded)
    assert bf16_out.loss.dtype == torch.float32
    assert torch.equal(bf16_out.per_pair, fp32_out.per_pair)
    for key in values:
        assert bf16_grads[key].dtype == torch.bfloat16
        torch.testing.assert_close(bf16_grads[key].float(), fp32_grads[key].to(torch.bfloat16).float())


@pytest.mark.parametrize("name", ["ipo", "sppo_hard"])
def test_square_losses_pull_towards_their_target(name):
    # At β = 0.1 both targets are 1/(2β) = 5 (IPO: the margin, SPPO: the chosen log-ratio, rejected at 0).
    policy_chosen = leaf([8.0, 2.0])
    scores = PairScores(policy_chosen, torch.zeros(2), torch.zeros(2), torch.zeros(2))
    compute_loss(scores, LossConfig(type=[name], beta=0.1)).loss.backward()
    assert policy_chosen.grad[0] > 0 and policy_chosen.grad[1] < 0


log_prob = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False, width=32)
batch = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(*[st.lists(log_prob, min_size=n, max_size=n) for _ in range(4)])
)


def pair_scores(values, **extra) -> PairScores:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (torch.tensor(v) for v in values)
    return PairScores(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **extra)


def swapped(values):
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = values
    return policy_rejected, policy_chosen, ref_rejected, ref_chosen


@settings(max_examples=40, deadline=None)
@given(batch)
def test_swapping_chosen_and_rejected_negates_the_margin(values):
    config = LossConfig(type=["sigmoid"], beta=0.5)
    out = compute_loss(pair_scores(values), config)
    out_swapped = compute_loss(pair_scores(swapped(values)), config)
    torch.testing.assert_close(out_swapped.metrics["reward_margin"], -out.metrics["reward_margin"])
    torch.testing.assert_close(out_swapped.chosen_rewards, out.rejected_rewards)
    # −log σ(z) + log σ(−z) = −z: the two losses differ by exactly −βΔ.
    margin = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(out.per_pair - out_swapped.per_pair, -margin, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(batch, st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6))
def test_soft_label_of_swapped_pair_is_one_minus_label(values, labels):
    label = torch.tensor(labels[: len(values[0])])
    config = LossConfig(type=["sigmoid"], beta=0.5, label_smoothing=0.1)
    out = compute_loss(pair_scores(values, label=label), config)
    out_swapped = compute_loss(pair_scores(swapped(values), label=1.0 - label), config)
    torch.testing.assert_close(out.per_pair, out_swapped.per_pair, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(batch, st.floats(0.01, 5000.0))
def test_label_one_half_has_zero_gradient_at_zero_margin(values, beta):
    # The rejected sample repeats the chosen one's scores, so h_w = h_l exactly and the margin is zero.
    policy, _, ref, _ = values
    policy_chosen, policy_rejected = leaf(policy), leaf(policy)
    label = torch.full((len(policy),), 0.5)
    scores = PairScores(policy_chosen, policy_rejected, torch.tensor(ref), torch.tensor(ref), label=label)
    compute_loss(scores, LossConfig(type=["sigmoid"], beta=beta)).loss.backward()
    assert torch.equal(policy_chosen.grad, torch.zeros(len(policy)))
    assert torch.equal(policy_rejected.grad, torch.zeros(len(policy)))


@pytest.mark.parametrize("name", PER_PAIR_LOSSES)
def test_per_pair_losses_are_batch_order_equivariant(name):
    @settings(max_examples=10, deadline=None)
    @given(batch, st.randoms(use_true_random=False))
    def check(values, random):
        permutation = list(range(len(values[0])))
        random.shuffle(permutation)
        lengths = torch.arange(1.0, len(permutation) + 1)
        base = pair_scores(values, chosen_lengths=lengths, rejected_lengths=lengths)
        permuted = pair_scores(
            [[v[i] for i in permutation] for v in values],
            chosen_lengths=lengths[permutation],
            rejected_lengths=lengths[permutation],
        )
        config = config_for(name)
        # Unpaired losses return [desirable, undesirable]: each half follows the permutation.
        expected = (
            compute_loss(base, config).per_pair.reshape(-1, len(permutation))[:, permutation].reshape(-1)
        )
        torch.testing.assert_close(compute_loss(permuted, config).per_pair, expected)

    check()


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_batch_level_losses_are_batch_order_invariant(name):
    values = (
        [-1.0, -5.0, -2.0, -8.0],
        [-3.0, -1.0, -6.0, -2.0],
        [-2.0, -4.0, -2.5, -7.0],
        [-2.0, -2.0, -5.0, -1.0],
    )
    permutation = [2, 0, 3, 1]
    out = compute_loss(pair_scores(values), config_for(name))
    out_permuted = compute_loss(pair_scores([[v[i] for i in permutation] for v in values]), config_for(name))
    torch.testing.assert_close(out.per_pair, out_permuted.per_pair)


def test_config_and_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"exo_pair, which needs loss\.label_smoothing > 0"):
        LossConfig(type=["exo_pair"])
    with pytest.raises(ValueError, match=r"loss\.f_divergence='forward_kl' but no loss.*\['kto'\] uses it"):
        compute_loss(
            pair_scores(([-1.0], [-2.0], [-1.0], [-1.0])), LossConfig(type=["kto"], f_divergence="forward_kl")
        )
    with pytest.raises(ValueError, match=r"loss 'simpo' needs PairScores\.chosen_lengths"):
        compute_loss(pair_scores(([-1.0], [-2.0], [-1.0], [-1.0])), LossConfig(type=["simpo"]))
    with pytest.raises(ValueError, match=r"terms of different sizes \{'kto': 4, 'sft': 2\}"):
        compute_loss(
            pair_scores(([-1.0] * 2, [-2.0] * 2, [-1.0] * 2, [-1.0] * 2)), LossConfig(type=["kto", "sft"])
        )
    with pytest.raises(ValueError, match=r"loss 'aot' sorts scores across the batch"):
        compute_loss(
            pair_scores(([-1.0] * 2, [-2.0] * 2, [-1.0] * 2, [-1.0] * 2), weight=torch.ones(2)),
            LossConfig(type=["aot"]),
        )
    with pytest.raises(ValueError, match=r"loss\.f_divergence='chi2' is not one of"):
        LossConfig(f_divergence="chi2")
    with pytest.raises(ValueError, match=r"loss\.label_smoothing=0\.5 must be in \[0, 0\.5\)"):
        LossConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"chosen_lengths / rejected_lengths must be > 0"):
        compute_loss(
            pair_scores(
                ([-1.0], [-2.0], [-1.0], [-1.0]),
                chosen_lengths=torch.zeros(1),
                rejected_lengths=torch.ones(1),
            ),
            LossConfig(type=["ipo"]),
        )


def test_unpaired_losses_accept_an_empty_side():
    scores = PairScores(
        policy_chosen=torch.tensor([-1.0, -2.0]),
        policy_rejected=torch.zeros(0),
        ref_chosen=torch.tensor([-1.5, -1.0]),
        ref_rejected=torch.zeros(0),
    )
    out = compute_loss(scores, LossConfig(type=["kto"], beta=1.0))
    assert out.per_pair.shape == (2,) and torch.isfinite(out.loss)
    assert "rejected_reward" not in out.metrics and "reward_accuracy" not in out.metrics
