"""Every registered loss against its equation, written out here in plain float maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.losses import LOSSES, LossConfig, PairScores, compute_loss

POLICY_CHOSEN = [-12.0, -30.5, -7.25, -50.0, -3.0]
POLICY_REJECTED = [-14.0, -29.0, -9.0, -48.5, -6.0]
REF_CHOSEN = [-12.5, -30.0, -8.0, -49.0, -4.5]
REF_REJECTED = [-13.0, -30.0, -8.5, -49.5, -4.0]
CHOSEN_LENGTHS = [4.0, 10.0, 2.0, 25.0, 3.0]
REJECTED_LENGTHS = [5.0, 8.0, 3.0, 20.0, 6.0]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def scores(**overrides) -> PairScores:
    fields = dict(
        policy_chosen=torch.tensor(POLICY_CHOSEN),
        policy_rejected=torch.tensor(POLICY_REJECTED),
        ref_chosen=torch.tensor(REF_CHOSEN),
        ref_rejected=torch.tensor(REF_REJECTED),
        chosen_lengths=torch.tensor(CHOSEN_LENGTHS),
        rejected_lengths=torch.tensor(REJECTED_LENGTHS),
    )
    fields.update(overrides)
    return PairScores(**fields)


def pairs():
    """Yield (pc, pr, h_w, h_l, |y_w|, |y_l|) per pair."""
    for pc, pr, rc, rr, lc, lr in zip(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF_CHOSEN,
        REF_REJECTED,
        CHOSEN_LENGTHS,
        REJECTED_LENGTHS,
        strict=True,
    ):
        yield pc, pr, pc - rc, pr - rr, lc, lr


B, EPS, TAU, GAMMA, LAMBDA = 0.3, 0.1, 0.05, 0.5, 50.0


def pair_losses(pc: float, pr: float, hw: float, hl: float, lc: float, lr: float) -> dict[str, float]:
    """Every pairwise loss of one pair, from the paper's / TRL's equation (β=B, ε=EPS, τ=TAU, γ=GAMMA)."""
    d = hw - hl
    chosen_average, rejected_average = pc / lc, pr / lr
    chosen_odds = chosen_average - math.log(1 - math.exp(chosen_average))
    rejected_odds = rejected_average - math.log(1 - math.exp(rejected_average))
    log_odds = chosen_odds - rejected_odds
    return {
        "sigmoid": -log_sigmoid(B * d),
        "robust": (-(1 - EPS) * log_sigmoid(B * d) + EPS * log_sigmoid(-B * d)) / (1 - 2 * EPS),
        "hinge": max(0.0, 1 - B * d),
        "ipo": (hw / lc - hl / lr - 1 / (2 * B)) ** 2,
        "exo_pair": sigmoid(B * d) * (math.log(sigmoid(B * d)) - math.log(1 - EPS))
        + sigmoid(-B * d) * (math.log(sigmoid(-B * d)) - math.log(EPS)),
        "discopop": (1 - sigmoid(B * d / TAU)) * -log_sigmoid(B * d)
        + sigmoid(B * d / TAU) * math.exp(-B * d),
        "sigmoid_norm": -log_sigmoid(B * (hw / lc - hl / lr)),
        "nca_pair": -log_sigmoid(B * hw) - 0.5 * log_sigmoid(-B * hw) - 0.5 * log_sigmoid(-B * hl),
        "bco_pair": -log_sigmoid(B * hw) - log_sigmoid(-B * hl),
        "sppo_hard": (hw - 1 / (2 * B)) ** 2 + (hl + 1 / (2 * B)) ** 2,
        "apo_zero": (1 - sigmoid(B * hw)) + sigmoid(B * hl),
        "apo_down": sigmoid(B * hw) + (1 - sigmoid(B * d)),
        "cpo": -log_sigmoid(B * (pc - pr)),
        "simpo": -log_sigmoid(B * (chosen_average - rejected_average) - GAMMA),
        "orpo": -B * log_sigmoid(log_odds),
        "sft": -pc / lc,
        # Smaug, arXiv 2402.13228, Eq. 3: −log σ(β(h_w − h_l − λ·max(0, log πref(y_w)/πθ(y_w)))).
        "dpop": -log_sigmoid(B * (d - LAMBDA * max(0.0, -hw))),
        # Cal-DPO (tengxiao1/Cal-DPO): −log σ(h_w − h_l) + ½[(h_w − 1/(2β))² + (h_l + 1/(2β))²].
        "cal_dpo": -log_sigmoid(d) + 0.5 * ((hw - 1 / (2 * B)) ** 2 + (hl + 1 / (2 * B)) ** 2),
        # SimPER (tengxiao1/SimPER): −exp(ℓ̄_w) + exp(ℓ̄_l).
        "simper": -math.exp(chosen_average) + math.exp(rejected_average),
        # ASFT's alignment term with β: −log σ(β·odds_w) − log σ(−β·odds_l).
        "asft": -log_sigmoid(B * chosen_odds) - log_sigmoid(-B * rejected_odds),
    }


def expected_pairwise(name: str) -> list[float]:
    return [pair_losses(*pair)[name] for pair in pairs()]


PAIRWISE = [
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm", "nca_pair", "bco_pair",
    "sppo_hard", "apo_zero", "apo_down", "cpo", "simpo", "orpo", "sft", "dpop", "cal_dpo", "simper", "asft",
]  # fmt: skip


def config(name: str, **overrides) -> LossConfig:
    label_smoothing = EPS if name in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    fields = dict(
        type=[name],
        beta=B,
        label_smoothing=label_smoothing,
        discopop_tau=TAU,
        simpo_gamma=GAMMA,
        dpop_lambda=LAMBDA,
    )
    fields.update(overrides)
    return LossConfig(**fields)


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_loss_matches_equation(name):
    out = compute_loss(scores(), config(name))
    np.testing.assert_allclose(out.per_pair.numpy(), expected_pairwise(name), rtol=2e-5, atol=1e-6)


def test_every_registered_loss_has_a_formula_test():
    tested = {*PAIRWISE, "aot", "aot_unpaired", "kto", "npo", "apo_zero_unpaired", "beta_dpo"}
    token_level = {"tdpo1", "tdpo2"}  # against their formulas in test_losses_token_level.py
    assert tested | token_level == set(LOSSES)


def test_ipo_without_lengths_uses_plain_margin():
    out = compute_loss(scores(chosen_lengths=None, rejected_lengths=None), config("ipo"))
    expected = [(hw - hl - 1 / (2 * B)) ** 2 for _, _, hw, hl, _, _ in pairs()]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)


def test_simpo_and_cpo_label_smoothing():
    epsilon = 0.2
    simpo = compute_loss(scores(), config("simpo", label_smoothing=epsilon))
    cpo = compute_loss(scores(), config("cpo", label_smoothing=epsilon))
    simpo_expected, cpo_expected = [], []
    for pc, pr, _, _, lc, lr in pairs():
        z = B * (pc / lc - pr / lr) - GAMMA
        simpo_expected.append(-(1 - epsilon) * log_sigmoid(z) - epsilon * log_sigmoid(-z))
        z = B * (pc - pr)
        cpo_expected.append(-(1 - epsilon) * log_sigmoid(z) - epsilon * log_sigmoid(-z))
    np.testing.assert_allclose(simpo.per_pair.numpy(), simpo_expected, rtol=1e-5)
    np.testing.assert_allclose(cpo.per_pair.numpy(), cpo_expected, rtol=1e-5)


def test_orpo_plus_sft_is_orpo():
    out = compute_loss(scores(), config("orpo", type=["orpo", "sft"]))
    expected = [o + s for o, s in zip(expected_pairwise("orpo"), expected_pairwise("sft"), strict=True)]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)


def test_aot_sorts_margins_across_the_batch():
    out = compute_loss(scores(), config("aot"))
    policy_margins = sorted(pc - pr for pc, pr in zip(POLICY_CHOSEN, POLICY_REJECTED, strict=True))
    ref_margins = sorted(rc - rr for rc, rr in zip(REF_CHOSEN, REF_REJECTED, strict=True))
    expected = [
        -(1 - EPS) * log_sigmoid(B * (p - r)) - EPS * log_sigmoid(-B * (p - r))
        for p, r in zip(policy_margins, ref_margins, strict=True)
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)


def test_aot_unpaired_sorts_log_ratios_across_the_batch():
    out = compute_loss(scores(), config("aot_unpaired"))
    chosen = sorted(hw for _, _, hw, _, _, _ in pairs())
    rejected = sorted(hl for _, _, _, hl, _, _ in pairs())
    expected = [
        -(1 - EPS) * log_sigmoid(B * (c - r)) - EPS * log_sigmoid(-B * (c - r))
        for c, r in zip(chosen, rejected, strict=True)
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)


def test_kto_unpaired_with_reference_point_and_class_weights():
    desirable_policy, desirable_ref = [-5.0, -9.0, -2.0], [-6.0, -8.0, -2.5]
    undesirable_policy, undesirable_ref = [-7.0, -3.0], [-6.0, -3.5]
    z0, beta, desirable_weight, undesirable_weight = 0.7, 0.4, 1.5, 0.5
    out = compute_loss(
        PairScores(
            policy_chosen=torch.tensor(desirable_policy),
            policy_rejected=torch.tensor(undesirable_policy),
            ref_chosen=torch.tensor(desirable_ref),
            ref_rejected=torch.tensor(undesirable_ref),
            kl_reference_point=torch.tensor(z0),
        ),
        LossConfig(
            type=["kto"],
            beta=beta,
            kto_desirable_weight=desirable_weight,
            kto_undesirable_weight=undesirable_weight,
        ),
    )
    expected = [
        desirable_weight * (1 - sigmoid(beta * ((p - r) - z0)))
        for p, r in zip(desirable_policy, desirable_ref, strict=True)
    ] + [
        undesirable_weight * (1 - sigmoid(beta * (z0 - (p - r))))
        for p, r in zip(undesirable_policy, undesirable_ref, strict=True)
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)
    # Three desirable and two undesirable samples are not pairs: no accuracy or margin.
    assert "reward_accuracy" not in out.metrics and "reward_margin" not in out.metrics
    assert out.metrics["chosen_reward"].item() == pytest.approx(
        beta * np.mean([p - r for p, r in zip(desirable_policy, desirable_ref, strict=True)])
    )


def test_kto_reference_point_defaults_to_zero():
    out = compute_loss(scores(), LossConfig(type=["kto"], beta=B))
    expected = [1 - sigmoid(B * hw) for _, _, hw, _, _, _ in pairs()] + [
        1 - sigmoid(-B * hl) for _, _, _, hl, _, _ in pairs()
    ]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)


def test_npo_uses_only_the_undesirable_samples():
    beta = 0.25
    out = compute_loss(
        PairScores(
            policy_chosen=torch.tensor([-1.0, -2.0, -3.0]),
            policy_rejected=torch.tensor([-4.0, -9.0]),
            ref_chosen=torch.tensor([-1.0, -2.0, -3.0]),
            ref_rejected=torch.tensor([-5.0, -8.0]),
        ),
        LossConfig(type=["npo"], beta=beta),
    )
    expected = [-(2 / beta) * log_sigmoid(-beta * h) for h in (1.0, -1.0)]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)


def f_score(h: float, divergence: str, alpha: float) -> float:
    if divergence == "forward_kl":
        return -math.exp(-h)
    if divergence == "js_divergence":
        return log_sigmoid(h)
    if divergence == "alpha_divergence":
        return math.exp((alpha - 1) * h) / (alpha - 1)
    return h


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores_feed_margin_and_pair_losses(divergence):
    alpha = 0.3
    for name in ("sigmoid", "nca_pair", "sigmoid_norm", "apo_down"):
        out = compute_loss(scores(), config(name, f_divergence=divergence, alpha_divergence_coef=alpha))
        expected = []
        for _, _, hw, hl, lc, lr in pairs():
            sw, sl = f_score(hw, divergence, alpha), f_score(hl, divergence, alpha)
            expected.append(
                {
                    "sigmoid": -log_sigmoid(B * (sw - sl)),
                    "nca_pair": -log_sigmoid(B * sw)
                    - 0.5 * log_sigmoid(-B * sw)
                    - 0.5 * log_sigmoid(-B * sl),
                    "sigmoid_norm": -log_sigmoid(B * (sw / lc - sl / lr)),
                    "apo_down": sigmoid(B * hw) + (1 - sigmoid(B * (sw - sl))),
                }[name]
            )
        np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=2e-5, err_msg=name)
        # Rewards stay β·log-ratio whatever the divergence.
        np.testing.assert_allclose(
            out.chosen_rewards.numpy(), [B * hw for _, _, hw, _, _, _ in pairs()], rtol=1e-6
        )


def test_alpha_divergence_at_one_is_reverse_kl():
    reverse = compute_loss(scores(), config("sigmoid"))
    alpha_one = compute_loss(
        scores(), config("sigmoid", f_divergence="alpha_divergence", alpha_divergence_coef=1.0)
    )
    torch.testing.assert_close(alpha_one.per_pair, reverse.per_pair)


def test_mpo_style_three_term_combination():
    weights = [0.8, 0.2, 1.0]
    out = compute_loss(scores(), config("sigmoid", type=["sigmoid", "bco_pair", "sft"], weights=weights))
    terms = [expected_pairwise(name) for name in ("sigmoid", "bco_pair", "sft")]
    expected = [sum(w * t[i] for w, t in zip(weights, terms, strict=True)) for i in range(len(POLICY_CHOSEN))]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)
    assert out.loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    for name, term in zip(("sigmoid", "bco_pair", "sft"), terms, strict=True):
        assert out.metrics[f"loss/{name}"].item() == pytest.approx(np.mean(term), rel=1e-5)


def test_asft_at_beta_one_is_the_papers_absolute_likelihood_loss():
    """β = 1: −log σ(log odds) = −log p̄, so L_align = −log p̄(y_w) − log(1 − p̄(y_l)) (arXiv 2409.10571)."""
    out = compute_loss(scores(), config("asft", beta=1.0))
    expected = [-pc / lc - math.log(1 - math.exp(pr / lr)) for pc, pr, _, _, lc, lr in pairs()]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("margin_baseline", [None, 0.4])
def test_beta_dpo_scales_beta_by_the_batch_margin(margin_baseline):
    """junkangwu/beta-DPO: β_used = max(β(1 + a(mean(M) − M0)), 1e-3), M = h_w − h_l, L = −log σ(β_used·M)."""
    a = 0.6
    extra = {} if margin_baseline is None else {"margin_baseline": torch.tensor(margin_baseline)}
    out = compute_loss(scores(**extra), config("beta_dpo", beta_dpo_alpha=a))
    margins = [hw - hl for _, _, hw, hl, _, _ in pairs()]
    baseline = 0.0 if margin_baseline is None else margin_baseline
    beta_used = max(B * (1 + a * (np.mean(margins) - baseline)), 1e-3)
    np.testing.assert_allclose(
        out.per_pair.numpy(), [-log_sigmoid(beta_used * m) for m in margins], rtol=1e-5
    )
    # β_used is detached: the gradient is that of DPO with a fixed β_used.
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    compute_loss(
        scores(policy_chosen=policy_chosen, **extra), config("beta_dpo", beta_dpo_alpha=a)
    ).loss.backward()
    expected_grad = [-beta_used * (1 - sigmoid(beta_used * m)) / len(margins) for m in margins]
    np.testing.assert_allclose(policy_chosen.grad.numpy(), expected_grad, rtol=1e-5)


def test_beta_dpo_clamps_beta_at_one_thousandth():
    out = compute_loss(scores(margin_baseline=torch.tensor(1e4)), config("beta_dpo", beta_dpo_alpha=0.6))
    margins = [hw - hl for _, _, hw, hl, _, _ in pairs()]
    np.testing.assert_allclose(out.per_pair.numpy(), [-log_sigmoid(1e-3 * m) for m in margins], rtol=1e-5)


def test_apo_zero_unpaired_is_trls_kto_trainer_formula():
    """TRL KTOTrainer, loss_type="apo_zero_unpaired": λ_D(1 − σ(βh)) desirable, λ_U·σ(βh) undesirable."""
    desirable, undesirable = (1.0, -2.0, 0.5), (-1.5, 3.0)
    out = compute_loss(
        PairScores(
            policy_chosen=torch.tensor(desirable),
            policy_rejected=torch.tensor(undesirable),
            ref_chosen=torch.zeros(3),
            ref_rejected=torch.zeros(2),
        ),
        LossConfig(type=["apo_zero_unpaired"], beta=B, kto_desirable_weight=1.5, kto_undesirable_weight=0.5),
    )
    expected = [1.5 * (1 - sigmoid(B * h)) for h in desirable] + [0.5 * sigmoid(B * h) for h in undesirable]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-6)


def alphapo(logp: float, alpha: float) -> float:
    return (1 - math.exp(logp) ** (-alpha)) / alpha


@pytest.mark.parametrize("alpha", [0.25, -0.1])
def test_alphapo_reshapes_simpo_and_cpo_rewards_as_trls_cpo_trainer(alpha):
    """TRL CPOTrainer with `alpha`: r = (1 − p^(−α))/α, p = exp(ℓ) (ℓ averaged for simpo, summed for cpo);
    simpo: −log σ(β(r_w − r_l) − γ); sigmoid: −log σ(β(r_w − r_l)); logged rewards β·r."""
    reference_free = scores(ref_chosen=None, ref_rejected=None)
    simpo = compute_loss(reference_free, config("simpo", alphapo_alpha=alpha))
    cpo = compute_loss(reference_free, config("cpo", alphapo_alpha=alpha))
    simpo_expected, cpo_expected, simpo_rewards = [], [], []
    for pc, pr, _, _, lc, lr in pairs():
        rw, rl = alphapo(pc / lc, alpha), alphapo(pr / lr, alpha)
        simpo_expected.append(-log_sigmoid(B * (rw - rl) - GAMMA))
        simpo_rewards.append(B * rw)
        cpo_expected.append(-log_sigmoid(B * (alphapo(pc, alpha) - alphapo(pr, alpha))))
    np.testing.assert_allclose(simpo.per_pair.numpy(), simpo_expected, rtol=1e-5)
    np.testing.assert_allclose(cpo.per_pair.numpy(), cpo_expected, rtol=1e-5)
    np.testing.assert_allclose(simpo.chosen_rewards.numpy(), simpo_rewards, rtol=1e-5)


@pytest.mark.parametrize("name", ["simpo", "orpo", "asft", "simper"])
def test_length_averaged_losses_log_per_token_rewards_as_trl(name):
    """TRL's CPOTrainer (SimPO) and ORPOTrainer log β × the length-averaged log-prob, not β × the sum."""
    out = compute_loss(scores(ref_chosen=None, ref_rejected=None), config(name))
    np.testing.assert_allclose(
        out.chosen_rewards.numpy(), [B * pc / lc for pc, _, _, _, lc, _ in pairs()], rtol=1e-6
    )
    np.testing.assert_allclose(
        out.rejected_rewards.numpy(), [B * pr / lr for _, pr, _, _, _, lr in pairs()], rtol=1e-6
    )


def test_rpo_alpha_is_trl_023s_batch_token_mean_nll():
    """TRL ≤ 0.23: losses + rpo_alpha·CE(chosen logits), the CE a mean over every chosen token of the batch."""
    alpha = 0.7
    out = compute_loss(scores(), config("sigmoid", rpo_alpha=alpha))
    nll = -sum(POLICY_CHOSEN) / sum(CHOSEN_LENGTHS)
    expected = [loss + alpha * nll for loss in expected_pairwise("sigmoid")]
    np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=1e-5)
    assert out.loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    # Without lengths (diffusion scores) the NLL is the mean of −score over the batch.
    diffusion = compute_loss(
        scores(chosen_lengths=None, rejected_lengths=None), config("sigmoid", rpo_alpha=alpha)
    )
    np.testing.assert_allclose(
        diffusion.per_pair.numpy(),
        [loss - alpha * np.mean(POLICY_CHOSEN) for loss in expected_pairwise("sigmoid")],
        rtol=1e-5,
    )


def trl_f_divergence_score(h: float, divergence: str, alpha: float) -> float:
    """TRL DPOTrainer (f2cd577, `f_divergence_type`): forward_kl −exp(−h) (f′(t) = 1 − 1/t, constant dropped),
    js_divergence log σ(h) (log 2 dropped), alpha_divergence exp((α−1)h)/(α−1) (the −1/(α−1) dropped)."""
    return f_score(h, divergence, alpha)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_length_normalised_f_divergence_losses_match_trl_when_lengths_differ(divergence):
    """TRL's `ipo` and `sigmoid_norm` divide each side's f-divergence score by its own completion length, so
    the constants TRL drops from s(h) would not cancel; TRL drops them all the same, and so do we. The pairs
    here have chosen and rejected lengths that differ (4 vs 5, 10 vs 8, ...)."""
    alpha = 0.3
    for name in ("ipo", "sigmoid_norm"):
        out = compute_loss(scores(), config(name, f_divergence=divergence, alpha_divergence_coef=alpha))
        expected = []
        for _, _, hw, hl, lc, lr in pairs():
            sw, sl = (
                trl_f_divergence_score(hw, divergence, alpha),
                trl_f_divergence_score(hl, divergence, alpha),
            )
            delta = sw / lc - sl / lr
            expected.append((delta - 1 / (2 * B)) ** 2 if name == "ipo" else -log_sigmoid(B * delta))
        assert CHOSEN_LENGTHS != REJECTED_LENGTHS
        np.testing.assert_allclose(out.per_pair.numpy(), expected, rtol=2e-5, err_msg=name)
