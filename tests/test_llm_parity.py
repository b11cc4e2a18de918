"""Parity with TRL: on the same model and batch, our per-pair losses equal TRL's formulas evaluated on
log-probs computed naively (one unpadded sequence at a time, full log-softmax).

The formulas are written out here from TRL's DPOTrainer, CPOTrainer, ORPOTrainer and KTOTrainer (reverse-KL
divergence, the default), independently of ``diffalign.losses``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import llm_config
from tiny_pipelines import build_tiny_llm

from diffalign.llm.trainer import LLMRecipe
from diffalign.losses import LossConfig, compute_loss
from diffalign.training import make_accelerator

BETA, EPSILON, TAU, GAMMA = 0.5, 0.1, 0.05, 0.3
logsigmoid = F.logsigmoid


def sorted_margin_loss(d: torch.Tensor) -> torch.Tensor:
    return -logsigmoid(BETA * d)


# (policy log-probs, reference log-probs, lengths) of chosen (w) and rejected (l) → TRL's per-pair loss.
TRL_PAIR_LOSSES = {
    "sigmoid": lambda p, r, n: -logsigmoid(BETA * margin(p, r)),
    "hinge": lambda p, r, n: torch.relu(1 - BETA * margin(p, r)),
    "ipo": lambda p, r, n: ((p.w - r.w) / n.w - (p.l - r.l) / n.l - 1 / (2 * BETA)) ** 2,
    "robust": lambda p, r, n: (
        (-(1 - EPSILON) * logsigmoid(BETA * margin(p, r)) + EPSILON * logsigmoid(-BETA * margin(p, r)))
        / (1 - 2 * EPSILON)
    ),
    "exo_pair": lambda p, r, n: (
        torch.sigmoid(BETA * margin(p, r))
        * (logsigmoid(BETA * margin(p, r)) - torch.log(torch.tensor(1 - 1e-3)))
        + torch.sigmoid(-BETA * margin(p, r))
        * (logsigmoid(-BETA * margin(p, r)) - torch.log(torch.tensor(1e-3)))
    ),
    "nca_pair": lambda p, r, n: (
        -logsigmoid(BETA * (p.w - r.w))
        - 0.5 * logsigmoid(-BETA * (p.w - r.w))
        - 0.5 * logsigmoid(-BETA * (p.l - r.l))
    ),
    "bco_pair": lambda p, r, n: -logsigmoid(BETA * (p.w - r.w)) - logsigmoid(-BETA * (p.l - r.l)),
    "sppo_hard": lambda p, r, n: (p.w - r.w - 1 / (2 * BETA)) ** 2 + (p.l - r.l + 1 / (2 * BETA)) ** 2,
    "aot": lambda p, r, n: sorted_margin_loss(torch.sort(p.w - p.l).values - torch.sort(r.w - r.l).values),
    "aot_unpaired": lambda p, r, n: sorted_margin_loss(
        torch.sort(p.w - r.w).values - torch.sort(p.l - r.l).values
    ),
    "apo_zero": lambda p, r, n: (1 - torch.sigmoid(BETA * (p.w - r.w))) + torch.sigmoid(BETA * (p.l - r.l)),
    "apo_down": lambda p, r, n: torch.sigmoid(BETA * (p.w - r.w)) + (1 - torch.sigmoid(BETA * margin(p, r))),
    "discopop": lambda p, r, n: (
        (1 - torch.sigmoid(BETA * margin(p, r) / TAU)) * -logsigmoid(BETA * margin(p, r))
        + torch.sigmoid(BETA * margin(p, r) / TAU) * torch.exp(-BETA * margin(p, r))
    ),
    "sigmoid_norm": lambda p, r, n: -logsigmoid(BETA * ((p.w - r.w) / n.w - (p.l - r.l) / n.l)),
    # CPOTrainer (reference-free): sigmoid and SimPO; ORPOTrainer's odds-ratio term.
    "cpo": lambda p, r, n: -logsigmoid(BETA * (p.w - p.l)),
    "simpo": lambda p, r, n: -logsigmoid(BETA * (p.w / n.w - p.l / n.l) - GAMMA),
    "orpo": lambda p, r, n: (
        -BETA
        * logsigmoid(
            (p.w / n.w - p.l / n.l)
            - (torch.log1p(-torch.exp(p.w / n.w)) - torch.log1p(-torch.exp(p.l / n.l)))
        )
    ),
    # Our `sft` is the per-sequence token-mean NLL of the chosen completion (TRL averages over the batch's tokens).
    "sft": lambda p, r, n: -p.w / n.w,
}


class Sides:
    def __init__(self, values: torch.Tensor, size: int) -> None:
        self.w, self.l = values[:size], values[size:]


def margin(p: Sides, r: Sides) -> torch.Tensor:
    return (p.w - r.w) - (p.l - r.l)


def naive_logps(model, batch, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and lengths, one unpadded row at a time with a full log-softmax (fp64)."""
    sums, lengths = [], []
    for i in rows:
        keep = batch["attention_mask"][i].bool()
        ids, completion = batch["input_ids"][i][keep], batch["completion_mask"][i][keep].bool()
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
        token_logps = log_probs[:-1].gather(-1, ids[1:, None]).squeeze(-1)
        sums.append(token_logps[completion[1:]].sum())
        lengths.append(completion.sum())
    return torch.stack(sums), torch.stack(lengths).double()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def drifted_recipe(tiny_dir, tmp_path, **sections) -> LLMRecipe:
    """A full fine-tune recipe whose policy has moved away from its frozen reference."""
    config = llm_config(
        tiny_dir, tmp_path, model={"trainable": "full"}, reference={"strategy": "frozen_copy"}, **sections
    )
    recipe = LLMRecipe(config, make_accelerator(config.run))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in recipe.model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return recipe


@pytest.fixture(scope="module")
def paired_case(tiny_dir, tmp_path_factory):
    recipe = drifted_recipe(tiny_dir, tmp_path_factory.mktemp("parity"))
    batch = recipe.collate([0, 3, 5, 7, 9, 11])
    size = len(batch["index"])
    rows = range(2 * size)
    policy, lengths = naive_logps(recipe.model, batch, rows)
    reference, _ = naive_logps(recipe.reference.model, batch, rows)
    return recipe, batch, Sides(policy, size), Sides(reference, size), Sides(lengths, size)


@pytest.mark.parametrize("loss", sorted(TRL_PAIR_LOSSES))
def test_per_pair_loss_matches_trl_formula(paired_case, loss):
    recipe, batch, policy, reference, lengths = paired_case
    scores, _ = recipe.pair_scores(recipe.model, batch)
    label_smoothing = {"exo_pair": 1e-3, "robust": EPSILON}.get(loss, 0.0)
    config = LossConfig(
        type=[loss], beta=BETA, label_smoothing=label_smoothing, discopop_tau=TAU, simpo_gamma=GAMMA
    )
    ours = compute_loss(scores, config).per_pair.double()
    expected = TRL_PAIR_LOSSES[loss](policy, reference, lengths)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # The margins are not all one sign, so the comparison covers both branches of every loss.
    assert (margin(policy, reference) > 0).any() and (margin(policy, reference) < 0).any()


def test_kto_matches_trl_formula(tiny_dir, tmp_path):
    """KTOTrainer: z0 = max(0, mean(policy − reference on mismatched pairs)), detached;
    desirable 1 − σ(β(h − z0)), undesirable 1 − σ(β(z0 − h))."""
    from test_llm_trainer import data_for

    recipe = drifted_recipe(tiny_dir, tmp_path, loss={"type": ["kto"]}, data=data_for("kto"))
    batch = recipe.collate(list(range(8)))
    policy, _ = naive_logps(recipe.model, batch, range(16))
    reference, _ = naive_logps(recipe.reference.model, batch, range(16))
    z0 = (policy[8:] - reference[8:]).mean().clamp(min=0)
    log_ratio = policy[:8] - reference[:8]
    desirable = batch["desirable"]
    assert desirable.any() and (~desirable).any()
    expected = torch.cat(
        [
            1 - torch.sigmoid(BETA * (log_ratio[desirable] - z0)),
            1 - torch.sigmoid(BETA * (z0 - log_ratio[~desirable])),
        ]
    )
    scores, _ = recipe.pair_scores(recipe.model, batch)
    ours = compute_loss(scores, LossConfig(type=["kto"], beta=BETA)).per_pair.double()
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
