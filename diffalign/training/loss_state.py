"""Running statistics a loss needs across steps, kept by the trainers and saved in their checkpoints.

The loss core stays pure: it is handed the statistic as an input (``PairScores.margin_baseline``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from diffalign.losses import PairScores, log_ratios
from diffalign.training.distributed import mean_over_processes


class MarginBaseline:
    """β-DPO's M0: an exponential running mean of the batches' mean margin M = h_w − h_l, starting at 0.

        M0 ← γ·M0 + (1 − γ)·mean_batch M      (γ = 0.9)

    updated with each micro-batch, over every process, before its loss, as the official code does
    (junkangwu/beta-DPO, trainers.py, ``update_and_sync_tensor_mean``).
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.value = 0.0

    def update(self, scores: PairScores) -> PairScores:
        """Fold this batch's margins into M0 and return ``scores`` carrying it."""
        chosen, rejected = log_ratios(scores)
        batch_margin = mean_over_processes((chosen - rejected).detach().float()).item()
        self.value = self.momentum * self.value + (1.0 - self.momentum) * batch_margin
        return replace(scores, margin_baseline=torch.tensor(self.value, device=chosen.device))

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
