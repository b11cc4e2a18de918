"""Policy-gradient losses and advantages against their equations, written out here on hand-built inputs, and
against TRL's GRPOTrainer / RLOOTrainer formulas (written here; TRL is not a dependency)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.losses import (
    AdvantageConfig,
    PolicyGradientConfig,
    compute_advantages,
    element_weight,
    kl_penalised_rewards,
    policy_gradient_loss,
)

# Three sequences of up to four elements (tokens, or denoising steps); the third has two elements.
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
NEW = [[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.1, -2.0, -9.0], [-0.7, -0.4, -5.0, -5.0]]
OLD = [[-1.1, -1.8, -0.5, -2.0], [-0.3, -1.0, -2.6, -1.0], [-0.9, -0.4, -1.0, -1.0]]
REF = [[-1.3, -2.2, -0.4, -2.5], [-0.1, -1.4, -2.2, -3.0], [-0.6, -0.9, -2.0, -2.0]]
ADVANTAGES = [1.5, -0.7, 0.4]


def tensors(new=NEW, old=OLD, ref=REF, advantages=ADVANTAGES, mask=MASK):
    return (
        torch.tensor(new, requires_grad=True),
        torch.tensor(old),
        torch.tensor(advantages),
        torch.tensor(mask, dtype=torch.float32),
        torch.tensor(ref),
    )


def element_losses(eps_low=0.2, eps_high=0.2, beta=0.0, sequence_ratio=False, delta=None):
    """ℓ_{i,t} by hand: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·ρ·(e^(ref−new) − (ref−new) − 1)."""
    out = []
    for i, (new, old, ref, mask) in enumerate(zip(NEW, OLD, REF, MASK, strict=True)):
        a = ADVANTAGES[i]
        seq_log_ratio = sum((n - o) * m for n, o, m in zip(new, old, mask, strict=True)) / max(sum(mask), 1)
        row = []
        for n, o, r in zip(new, old, ref, strict=True):
            rho = math.exp(seq_log_ratio if sequence_ratio else n - o)
            unclipped = min(rho, delta) if delta is not None else rho
            loss = -min(unclipped * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            loss += beta * rho * (math.exp(r - n) - (r - n) - 1)
            row.append(loss)
        out.append(row)
    return out


def reduce_by_hand(losses, loss_type, max_length=None, num_items=None):
    masked = [
        [loss * m for loss, m in zip(row, mask, strict=True)] for row, mask in zip(losses, MASK, strict=True)
    ]
    total = sum(sum(row) for row in masked)
    tokens = sum(sum(mask) for mask in MASK)
    if loss_type == "grpo":
        return sum(sum(row) / sum(mask) for row, mask in zip(masked, MASK, strict=True)) / len(MASK)
    if loss_type == "bnpo":
        return total / tokens
    if loss_type == "dr_grpo":
        return total / (len(MASK) * (max_length or len(MASK[0])))
    return total / (num_items if num_items is not None else tokens)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(("eps_high", "beta"), [(None, 0.0), (0.28, 0.0), (0.28, 0.04)])
def test_each_reduction_matches_its_equation(loss_type, eps_high, beta):
    new, old, advantages, mask, ref = tensors()
    config = PolicyGradientConfig(loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, beta=beta)
    out = policy_gradient_loss(new, old, advantages, mask, config, ref_logps=ref)
    expected = reduce_by_hand(element_losses(0.2, eps_high or 0.2, beta), loss_type)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_dr_grpo_divides_by_max_completion_length_and_dapo_by_num_items():
    new, old, advantages, mask, _ref = tensors()
    dr_grpo = policy_gradient_loss(
        new, old, advantages, mask, PolicyGradientConfig(loss_type="dr_grpo", max_completion_length=16)
    )
    assert dr_grpo.loss.item() == pytest.approx(
        reduce_by_hand(element_losses(), "dr_grpo", max_length=16), rel=1e-5
    )
    dapo = policy_gradient_loss(
        new, old, advantages, mask, PolicyGradientConfig(loss_type="dapo"), num_items=25.0
    )
    assert dapo.loss.item() == pytest.approx(
        reduce_by_hand(element_losses(), "dapo", num_items=25.0), rel=1e-5
    )


@pytest.mark.parametrize(
    ("loss_type", "max_length", "weight"),
    [("grpo", None, 1 / 12), ("bnpo", None, 1 / 12), ("dapo", None, 1 / 12), ("dr_grpo", None, 1 / 12),
     ("dr_grpo", 6, 1 / 18)],
)
def test_element_weight_makes_an_all_trained_batch_loss_a_sum_over_elements(loss_type, max_length, weight):
    """3 sequences × 4 elements, all trained: the loss is w·Σℓ (so a part of the elements may be backpropagated at a
    time); a sequence-level ratio is refused."""
    new, old, advantages, _, _ = tensors()
    config = PolicyGradientConfig(loss_type=loss_type, max_completion_length=max_length)
    output = policy_gradient_loss(new, old, advantages, torch.ones(3, 4), config)
    assert element_weight(config, 3, 4) == pytest.approx(weight)
    torch.testing.assert_close(output.loss, output.per_element.sum() * weight)
    for refused in (PolicyGradientConfig(loss_type="rloo"), PolicyGradientConfig(importance_level="sequence")):
        with pytest.raises(ValueError, match="sequence-level ratio"):
            element_weight(refused, 3, 4)


def test_gspo_shares_the_length_averaged_sequence_ratio():
    new, old, advantages, mask, _ref = tensors()
    config = PolicyGradientConfig(loss_type="grpo", importance_level="sequence", epsilon_high=0.28)
    out = policy_gradient_loss(new, old, advantages, mask, config)
    expected = reduce_by_hand(element_losses(0.2, 0.28, sequence_ratio=True), "grpo")
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_delta_caps_the_unclipped_ratio():
    new, old, advantages, mask, _ref = tensors()
    config = PolicyGradientConfig(loss_type="bnpo", delta=1.5)
    out = policy_gradient_loss(new, old, advantages, mask, config)
    assert out.loss.item() == pytest.approx(reduce_by_hand(element_losses(delta=1.5), "bnpo"), rel=1e-5)


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1.3, 1.0, True),  # above 1 + ε with A > 0: the clip bounds the gain, no gradient
        (1.3, -1.0, False),  # above 1 + ε with A < 0: the unclipped term is the smaller, gradient flows
        (0.7, -1.0, True),  # below 1 − ε with A < 0: clipped
        (0.7, 1.0, False),  # below 1 − ε with A > 0: unclipped
        (1.19, 1.0, False),  # just inside the range
        (1.25, 1.0, False),  # inside DAPO's decoupled upper bound 1 + 0.28 (checked with eps_high below)
    ],
)
def test_clipping_boundaries(ratio, advantage, clipped):
    eps_high = 0.28 if ratio == 1.25 else 0.2
    new = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old, mask = torch.zeros(1, 1), torch.ones(1, 1)
    config = PolicyGradientConfig(loss_type="bnpo", epsilon_low=0.2, epsilon_high=eps_high)
    out = policy_gradient_loss(new, old, torch.tensor([advantage]), mask, config)
    bounded = min(max(ratio, 0.8), 1 + eps_high)
    assert out.loss.item() == pytest.approx(-min(ratio * advantage, bounded * advantage), rel=1e-6)
    out.loss.backward()
    # d/d log ρ of −ρA is −ρA; a clipped element has none.
    expected_grad = 0.0 if clipped else -ratio * advantage
    assert new.grad.item() == pytest.approx(expected_grad, abs=1e-7)
    assert out.metrics["clip_ratio/region"].item() == (1.0 if clipped else 0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "rloo"])
def test_empty_masks_contribute_nothing_and_stay_finite(loss_type):
    new, old, advantages, _, _ref = tensors()
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    out = policy_gradient_loss(new, old, advantages, mask, PolicyGradientConfig(loss_type=loss_type))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(new.grad).all()
    assert torch.equal(new.grad[1], torch.zeros(4))  # the empty row gets no gradient
    assert torch.equal(new.grad[0, 2:], torch.zeros(2))
    empty = torch.zeros(3, 4)
    out = policy_gradient_loss(
        new.detach(), old, advantages, empty, PolicyGradientConfig(loss_type=loss_type)
    )
    # RLOO's sequence ratio of an empty sequence is e^0 = 1: its loss is −A, the others' is 0.
    expected = -advantages.mean().item() if loss_type == "rloo" else 0.0
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())


def test_on_policy_ratio_is_one_and_the_gradient_is_reinforce():
    """new = old: ρ = 1 everywhere, loss = −mean A per element, ∂loss/∂log π = −A·m/Σm (bnpo)."""
    new, _, advantages, mask, _ = tensors()
    out = policy_gradient_loss(new, new.detach(), advantages, mask, PolicyGradientConfig(loss_type="bnpo"))
    out.loss.backward()
    assert out.metrics["ratio/min"].item() == 1.0 and out.metrics["ratio/max"].item() == 1.0
    expected = -advantages[:, None] * mask / mask.sum()
    torch.testing.assert_close(new.grad, expected)


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, args):
    """TRL GRPOTrainer._compute_loss (huggingface/trl f2cd577), written out for one micro-batch, one process,
    no gradient accumulation (current_gradient_accumulation_steps = 1), num_items_in_batch = mask.sum()."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if args["importance_sampling_level"] == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if args["beta"] != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        per_token_kl = per_token_kl * coef_1  # use_bias_correction_kl=True
    coef_2 = torch.clamp(coef_1, 1 - args["epsilon"], 1 + args["epsilon_high"])
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if args["beta"] != 0.0:
        per_token_loss = per_token_loss + args["beta"] * per_token_kl
    loss_type = args["loss_type"]
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * args["max_completion_length"])
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, num_items_in_batch / 1 process


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_losses_match_trls_grpo_trainer_on_identical_log_probs(loss_type, level):
    generator = torch.Generator().manual_seed(0)
    batch, width = 6, 9
    old = -3 * torch.rand(batch, width, generator=generator)
    new = (old + 0.3 * torch.randn(batch, width, generator=generator)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(batch, width, generator=generator)
    lengths = torch.tensor([9, 4, 7, 1, 9, 5])
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    advantages = torch.randn(batch, generator=generator)
    args = dict(
        loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=0.28, beta=0.04,
        max_completion_length=12,
    )  # fmt: skip
    config = PolicyGradientConfig(
        loss_type=loss_type, importance_level=level, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
        max_completion_length=12,
    )  # fmt: skip
    ours = policy_gradient_loss(new, old, advantages, mask, config, ref_logps=ref).loss
    expected = trl_grpo_loss(new, old, ref, advantages, mask, args)
    torch.testing.assert_close(ours, expected)
    (ours_grad,) = torch.autograd.grad(ours, new)
    (expected_grad,) = torch.autograd.grad(expected, new)
    torch.testing.assert_close(ours_grad, expected_grad)


def test_rloo_loss_matches_trls_rloo_trainer():
    """TRL RLOOTrainer._compute_loss: ρ_i = exp(Σ_t m·log π − old_logps_i), −min(ρA, clip(ρ)A), mean."""
    new, old, advantages, mask, _ = tensors()
    out = policy_gradient_loss(new, old, advantages, mask, PolicyGradientConfig(loss_type="rloo"))
    logps = (new * mask).sum(1)
    old_logps = (old * mask).sum(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    expected = -torch.min(coef_1 * advantages, coef_2 * advantages).mean()
    torch.testing.assert_close(out.loss, expected)


def test_kl_is_k3_with_the_bias_correction_and_without():
    new, old, _advantages, mask, ref = tensors()
    zero_advantages = torch.zeros(3)
    for correction in (True, False):
        config = PolicyGradientConfig(loss_type="bnpo", beta=1.0, kl_bias_correction=correction)
        out = policy_gradient_loss(new, old, zero_advantages, mask, config, ref_logps=ref)
        total, count = 0.0, 0
        for n_row, o_row, r_row, m_row in zip(NEW, OLD, REF, MASK, strict=True):
            for n, o, r, m in zip(n_row, o_row, r_row, m_row, strict=True):
                k3 = math.exp(r - n) - (r - n) - 1
                total += m * k3 * (math.exp(n - o) if correction else 1.0)
                count += m
        assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
        assert out.metrics["kl"].item() == pytest.approx(total / count, rel=1e-5)


def test_bad_inputs_name_the_problem():
    new, old, advantages, mask, _ref = tensors()
    with pytest.raises(ValueError, match="needs ref_logps"):
        policy_gradient_loss(new, old, advantages, mask, PolicyGradientConfig(beta=0.1))
    with pytest.raises(ValueError, match="mask has shape"):
        policy_gradient_loss(new, old, advantages, mask[:, :2], PolicyGradientConfig())
    with pytest.raises(ValueError, match="loss_type="):
        PolicyGradientConfig(loss_type="ppo")


# --- advantages ---------------------------------------------------------------------------------------------------

REWARDS = [0.1, 0.9, 0.4, 0.4, 2.0, -1.0, 0.5, 0.3]  # two groups of four


def mean(values):
    return sum(values) / len(values)


def std(values):  # Bessel-corrected, as TRL's nanstd
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_mean_advantages_match_trls_grpo_trainer(scale):
    out = compute_advantages(torch.tensor(REWARDS), 4, AdvantageConfig(scale=scale))
    expected = []
    for group in (REWARDS[:4], REWARDS[4:]):
        for r in group:
            a = r - mean(group)
            if scale == "group":
                a /= std(group) + 1e-4
            elif scale == "batch":
                a /= std(REWARDS) + 1e-4
            expected.append(a)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_leave_one_out_advantages_match_trls_rloo_trainer(scale):
    out = compute_advantages(torch.tensor(REWARDS), 4, AdvantageConfig(baseline="leave_one_out", scale=scale))
    expected = []
    for group in (REWARDS[:4], REWARDS[4:]):
        expected += [r - (sum(group) - r) / 3 for r in group]
    if scale == "batch":
        expected = [(a - mean(expected)) / (std(expected) + 1e-4) for a in expected]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_several_weighted_rewards_sum_then_normalize_and_normalize_then_sum():
    second = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    rewards = torch.tensor([REWARDS, second]).T
    weights = [1.0, 0.5]
    summed = compute_advantages(rewards, 4, AdvantageConfig(reward_weights=weights))
    total = [a + 0.5 * b for a, b in zip(REWARDS, second, strict=True)]
    torch.testing.assert_close(summed, compute_advantages(torch.tensor(total), 4, AdvantageConfig()))

    gdpo = compute_advantages(
        rewards, 4, AdvantageConfig(reward_weights=weights, aggregation="normalize_then_sum")
    )
    per_reward = []
    for column in (REWARDS, second):
        z = []
        for group in (column[:4], column[4:]):
            z += [(r - mean(group)) / (std(group) + 1e-4) for r in group]
        per_reward.append(z)
    combined = [w0 + 0.5 * w1 for w0, w1 in zip(*per_reward, strict=True)]
    expected = [(c - mean(combined)) / (std(combined) + 1e-4) for c in combined]
    torch.testing.assert_close(gdpo, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_identical_rewards_give_zero_advantages_and_single_samples_no_nan():
    flat = compute_advantages(torch.ones(8), 4, AdvantageConfig())
    assert torch.equal(flat, torch.zeros(8))
    singles = compute_advantages(
        torch.tensor(REWARDS), 1, AdvantageConfig(baseline="leave_one_out", scale="none")
    )
    assert torch.equal(singles, torch.zeros(8))


def test_kl_penalised_rewards_subtract_the_summed_k1():
    _, old, _, mask, ref = tensors()
    out = kl_penalised_rewards(torch.tensor([1.0, 2.0, 3.0]), old, ref, mask, beta=0.05)
    expected = [
        r - 0.05 * sum((o - f) * m for o, f, m in zip(o_row, f_row, m_row, strict=True))
        for r, o_row, f_row, m_row in zip([1.0, 2.0, 3.0], OLD, REF, MASK, strict=True)
    ]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_advantage_errors_name_the_fix():
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages(torch.tensor(REWARDS), 3, AdvantageConfig())
    with pytest.raises(ValueError, match="RLOO"):
        AdvantageConfig(baseline="leave_one_out", scale="group")
    with pytest.raises(ValueError, match="one weight per reward"):
        compute_advantages(torch.ones(8, 2), 4, AdvantageConfig(reward_weights=[1.0]))
