"""TR-DPO's reference updates: every τ optimizer steps the frozen reference moves towards the policy,

    π_ref ← α·πθ + (1 − α)·π_ref      (α = 1: a hard copy)

Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", arXiv 2404.09656; TRL's
``sync_ref_model`` (``ref_model_mixup_alpha``, ``ref_model_sync_steps``, ``SyncRefModelCallback``). Both trainers
use it with a frozen-copy reference of a full fine-tune: the copy and the policy have the same parameters in the
same order. The update runs at the start of the first micro-batch after optimizer step k·τ, which is where TRL's
callback (on step end) leaves it too, and the reference's weights travel in the training checkpoint so that a
resumed run continues from the moved reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """π_ref ← α·πθ + (1 − α)·π_ref, parameter by parameter, in the reference's dtype."""
    for reference_parameter, policy_parameter in zip(
        reference.parameters(), policy.parameters(), strict=True
    ):
        reference_parameter.mul_(1.0 - alpha).add_(
            policy_parameter.detach().to(reference_parameter.dtype), alpha=alpha
        )


class ReferenceSync:
    """Moves ``reference`` towards the policy every ``every`` optimizer steps of ``accumulation_steps`` micro-batches."""

    def __init__(self, reference: nn.Module, *, every: int, alpha: float, accumulation_steps: int) -> None:
        self.reference = reference
        self.every = every
        self.alpha = alpha
        self.accumulation_steps = accumulation_steps

    def before_micro_batch(self, micro_batch: int, policy: nn.Module) -> bool:
        """Update the reference if ``micro_batch`` (0-based) opens the window after step k·every; True if it did."""
        if micro_batch == 0 or micro_batch % self.accumulation_steps != 0:
            return False
        if (micro_batch // self.accumulation_steps) % self.every != 0:
            return False
        mix_into_reference(self.reference, policy, self.alpha)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {name: tensor.detach().cpu().clone() for name, tensor in self.reference.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state)
