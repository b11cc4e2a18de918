"""The frozen reference denoiser of a preference loss.

With LoRA the reference is the policy itself with its adapters switched off, so no second copy is held; with a
full fine-tune it is a frozen copy made before training (optionally kept on the CPU and moved in per call).
Either way it runs under ``no_grad`` and is never part of what is trained or saved.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ReferenceDenoiser:
    def __init__(self, policy: nn.Module, *, frozen_copy: bool, offload_to_cpu: bool = False) -> None:
        self.policy = policy
        self.copy: nn.Module | None = None
        self.offload_to_cpu = offload_to_cpu
        if frozen_copy:
            self.copy = copy.deepcopy(policy).requires_grad_(False).eval()
            if offload_to_cpu:
                self.copy.to("cpu")

    @contextmanager
    def use(self, device: torch.device) -> Iterator[nn.Module]:
        """The reference, ready to call on ``device`` inside this context (gradients off)."""
        with torch.no_grad():
            if self.copy is None:
                # diffusers' PEFT integration: the base weights alone are the pretrained model.
                self.policy.disable_adapters()
                try:
                    yield self.policy
                finally:
                    self.policy.enable_adapters()
            elif self.offload_to_cpu:
                self.copy.to(device)
                try:
                    yield self.copy
                finally:
                    self.copy.to("cpu")
            else:
                yield self.copy
